"""The library behind the top-level commands (train.py, evaluate.py, audit_leakage.py, ...): nothing here is run.

    identity      file identity and its caches: content hashes, identical files, duplicate-patient groups, the
                  decode check and cache, perceptual hashes, the near-duplicate search
    splits        patient-level splits and their checks, the split flags
    train_flags   train.py's whole command line, torch-free: train.py parses it, audit_leakage.py accepts it
    run_folder    runs/<run-id>/: the lock, the refusal of an earlier model, the resume check, stop signals, requeue
    packed_cache  the packed uint8 patch cache and where patches are read from (PNGs or the cache)
    feeds         batches from the packed cache without a DataLoader: device-resident or streamed by a thread
    loaders       DataLoader workers: how they start, how their errors reach the user, how they stop
    augment       training augmentation as pure tensor functions, the default jitter
    sampling      the --limit-samples subset and the resumable epoch sampler
    optimization  one optimization step (train.py and tools/bench.py call the same one) and what it steps
    runlog        log.jsonl: the epoch records train.py writes and everyone reads back
    staining      the stain reference: --reference-patch, fitting, its fingerprint, the DAB-hue survey
    model         how the network runs: precision, model_input, a network and normalizer from a checkpoint
    metrics       AP, ROC-AUC, thresholds, exact and bootstrap intervals (plain numpy)
    analysis      what evaluation measures from scores: patch and patient metrics, the patient rule
    decision      the call: the choices stored with the model (rule, thresholds, who calls), calls and the vote
    crossval      evaluate.py --cv: pooling K fold runs
    ledger        runs/holdout_ledger.jsonl: every look at test or HoldOut labels, and what a report discloses
    inference     patches through a network for inference: the batches and model input evaluate.py and bags.py share
    unseen        which patches the patch model trains on and which a training bag may hold (none it trained on)
    encoders      pathology foundation encoders (timm) from a local weights file: architecture, input, output
    bags          the patient model's feature bags: extraction, storage keyed by what the features depend on
    mil           the patient model: gated-attention MIL, its training and checkpoint schema
    eval_report   evaluate.py's files: the eval folder swap, CSV/JSON, report.md
    html_report   report.html: the self-contained page of predict.py and evaluate.py
    figures       every chart
    gradcam       Grad-CAM maps and grids

The two shared modules the design card places at the top level: common.py (the conventions: errors, exit codes,
the flags every command spells the same, atomic writes; patient IDs and the dataset; building the model, the
checkpoint schema and reading a checkpoint) and macenko_gpu.py (batched stain normalization). The package imports
them; they import nothing of the package.
"""
