"""Every CUDA-only branch run end to end on demo data, checked against what the code promises, and the throughput
targets measured: one command for whoever has a GPU for ten minutes.

Usage:
    make gpu-check                                   # demo data, the first GPU, JSON in runs/gpu_check.json
    python tools/gpu_check.py --data-root demo_data --json gpu_check.json [--device cuda:0] [--stages resume,macenko]
    python tools/gpu_check.py --data-root demo_data --device cpu --stages resume,streamed   # the script's own plumbing

Stages (each a row of the closing table; a stage that crashes is a failed row, the others still run):
  resume     train.py --deterministic on the device-resident cache, 2 epochs straight; the same run stopped by a
             real SIGUSR1 (what SLURM sends) during its third step, then resumed: last.pt bitwise equal
  streamed   the straight run again, forced to stream from the host (--resident-max-frac 0: reading thread, side
             copy stream), and from PNGs through DataLoader workers: both bitwise equal to the resident run
  evaluate   evaluate.py's scores of the straight run, patches resident and streamed (and on cuda:1, a device that
             is not the current one, when there are two GPUs): equal
  compile    train.py --compile, one epoch: it finishes; its img/s
  torchrun   torchrun --nproc_per_node 1 train.py (NCCL on CUDA): exit 0
  macenko    IHC Macenko on the GPU against the CPU on the same 64 synthetic tiles (at most 1 grey level apart),
             and its img/s at batch 256, 224 px (target >= 40,000)
  bench      tools/bench.py at 224 px, batch 256, bf16, channels_last: loop / model-only ceiling (target >= 0.90),
             train.py's steady state / ceiling (>= 0.85), a 54,000-patch epoch (<= 5 s); then --compile's
             model_step (>= 15,000 img/s on an H200-class GPU)
  encoder    a ViT-L/16 foundation encoder (UNI's architecture, timm's random weights) on 256 px patches resized to
             224, bf16, batch 256: train_patient.py's extraction step (target >= 2,000 img/s; needs timm)
It ends with one table (stage, img/s, x ceiling, target, result) and the card's name; --json writes it with every
number. --device cpu runs the same code at tiny sizes: a check of this script, not a measurement (targets n/a).

Exit codes: 0 every check passed, 1 a check failed (the table names it), 2 no CUDA (one line, at once) or bad input.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]  # the workflow's commands and modules, one folder up
sys.path.insert(0, str(REPO))

import common

STAGES = ("resume", "streamed", "evaluate", "compile", "torchrun", "macenko", "bench", "encoder")
# the throughput targets (an H200-class GPU): loop and train.py as shares of the model-only ceiling, absolute rates
TARGETS = {"loop": 0.90, "train": 0.85, "compile_img_s": 15_000, "epoch_s": 5.0, "macenko_img_s": 40_000,
           "encoder_img_s": 2_000}  # a ViT-L/16 foundation encoder at 224 px in bf16 (an H100-class GPU)
SIZES = {"cuda": {"image_size": 64, "batch_size": 64}, "cpu": {"image_size": 32, "batch_size": 16}}  # train stages


def row(stage, ok, img_s=None, x_ceiling=None, target="", note="") -> dict:
    return {"stage": stage, "ok": ok, "img_s": img_s, "x_ceiling": x_ceiling, "target": target, "note": note}


class Check:
    """The state every stage shares: flags, device, a scratch folder, the demo cache, the straight run."""

    def __init__(self, args, scratch: Path):
        self.args, self.scratch, self.device = args, scratch, torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.size = SIZES["cuda" if self.cuda else "cpu"]
        self.cache = scratch / "cache"
        self.runs = scratch / "runs"

    def train_argv(self, run_id: str, *extra, cache=True) -> list[str]:
        return ["--data-root", self.args.data_root, "--runs-dir", str(self.runs), "--run-id", run_id,
                "--device", str(self.device), "--image-size", str(self.size["image_size"]),
                "--batch-size", str(self.size["batch_size"]), "--weights", "none", "--epochs", "2", "--seed", "0",
                "--workers", "2", "--deterministic", *(["--cache", str(self.cache)] if cache else []), *extra]

    def train(self, run_id: str, *extra, cache=True) -> int:
        import train
        with quiet():
            return train.main(self.train_argv(run_id, *extra, cache=cache))

    def weights(self, run_id: str) -> dict:
        return torch.load(self.runs / run_id / "last.pt", map_location="cpu", weights_only=True)["model"]

    def straight(self) -> str:
        """The uninterrupted reference run (trained once, by whichever stage needs it first)."""
        if not (self.runs / "straight" / "last.pt").is_file():
            if self.train("straight") != 0:
                raise RuntimeError("the straight train.py run failed")
        return "straight"


@contextlib.contextmanager
def quiet():
    """Training's progress bars and lines go to a log file, not the table's terminal."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def last_img_s(run_dir: Path):
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return json.loads(lines[-1]).get("img_s") if lines else None


# ----------------------------------------------------------------------------------------------- stages
def stage_resume(c: Check) -> list[dict]:
    from helico import model
    c.straight()
    real, calls = model.model_input, []

    def signal_in_third_step(images, *a, **kw):
        if kw.get("gen", a[2] if len(a) > 2 else None) is not None:  # a training step, not validation
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGUSR1)  # the real signal: train.py's handler sets its stop flag
        return real(images, *a, **kw)

    model.model_input = signal_in_third_step
    try:
        stopped = c.train("resumed")
    finally:
        model.model_input = real
    resumed = c.train("resumed")
    ok = stopped == common.EXIT_STOPPED and resumed == 0 and same(c.weights("resumed"), c.weights("straight"))
    return [row("train.py resident, SIGUSR1 + resume, --deterministic", ok, target="bitwise = straight run",
                note=f"exit {stopped} then {resumed}")]


def stage_streamed(c: Check) -> list[dict]:
    c.straight()
    streamed = c.train("streamed", "--resident-max-frac", "0")
    loader = c.train("loader", cache=False)
    reference = c.weights("straight")
    return [row("train.py streamed (side copy stream)", streamed == 0 and same(c.weights("streamed"), reference),
                last_img_s(c.runs / "streamed"), target="bitwise = resident run"),
            row("train.py PNGs through DataLoader workers", loader == 0 and same(c.weights("loader"), reference),
                last_img_s(c.runs / "loader"), target="bitwise = resident run")]


def scores(c: Check, name: str, *extra, device=None) -> dict:
    import evaluate
    out = c.scratch / "eval" / name
    argv = ["--checkpoint", str(c.runs / c.straight() / "best.pt"), "--data-root", c.args.data_root, "--cache",
            str(c.cache), "--device", str(device or c.device), "--out", str(out), "--gradcam", "0", "--bootstrap",
            "0", *extra]
    with quiet():
        if evaluate.main(argv) != 0:
            raise RuntimeError(f"evaluate.py {name} failed")
    with open(out / "predictions.csv", newline="") as f:
        return {r["path"]: float(r["score"]) for r in csv.DictReader(f)}


def stage_evaluate(c: Check) -> list[dict]:
    resident, streamed = scores(c, "resident"), scores(c, "streamed", "--resident-max-frac", "0")
    diff = max(abs(resident[p] - streamed[p]) for p in resident) if resident.keys() == streamed.keys() else None
    rows = [row("evaluate.py resident vs streamed", diff == 0.0, target="equal scores",
                note=f"{len(resident)} patches, max |diff| {diff}")]
    if c.cuda and torch.cuda.device_count() > 1 and c.device.index in (None, 0):
        other = scores(c, "cuda1", device="cuda:1")
        d1 = max(abs(resident[p] - other[p]) for p in resident)
        rows.append(row("evaluate.py on cuda:1 (not the current device)", d1 <= 1e-6, target="scores of cuda:0",
                        note=f"max |diff| {d1:.2e}"))
    else:
        rows.append(row("evaluate.py on cuda:1", None, note="one GPU: not run"))
    return rows


def stage_compile(c: Check) -> list[dict]:
    if not c.cuda:
        return [row("train.py --compile", None, note="not run on the CPU (needs a C++ toolchain; slow)")]
    code = c.train("compiled", "--compile", "--epochs", "1")
    return [row("train.py --compile", code == 0, last_img_s(c.runs / "compiled"), target="finishes",
                note=f"exit {code}")]


def stage_torchrun(c: Check) -> list[dict]:
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "train.py",
            *c.train_argv("ddp", "--epochs", "1")]
    argv[argv.index("--device") + 1] = "cuda" if c.cuda else "cpu"  # torchrun: each rank takes cuda:LOCAL_RANK
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
    tail = (done.stderr.strip().splitlines() or [""])[-1][:120]
    return [row(f"torchrun, 1 process ({'NCCL' if c.cuda else 'gloo'})", done.returncode == 0, target="exit 0",
                note=f"exit {done.returncode}: {tail}")]


def stage_macenko(c: Check) -> list[dict]:
    import macenko_gpu
    from helico import staining
    import stain
    normalizer = staining.fit_stain_reference(Path(c.args.data_root), staining.DEFAULT_REFERENCE)
    tiles = macenko_gpu.synthetic_ihc_tiles(64, 224, seed=1)
    on_cpu = normalizer.normalize(tiles).mul(255).round()
    on_device = normalizer.to(c.device).normalize(tiles.to(c.device)).mul(255).round().cpu()
    levels = (on_cpu - on_device).abs()
    batch = macenko_gpu.synthetic_ihc_tiles(256 if c.cuda else 16, 224 if c.cuda else 64, seed=2).to(c.device)
    normalizer.normalize(batch[:2])  # warm-up
    seconds = sorted(stain._timed(lambda: normalizer.normalize(batch), c.device)[0] for _ in range(5))[2]
    rate = len(batch) / seconds
    return [row("IHC Macenko, device vs CPU", float(levels.max()) <= 1, target="<= 1 grey level",
                note=f"max {levels.max():.0f}, {100 * float((levels > 0).float().mean()):.3f}% of values differ"),
            row(f"IHC Macenko, batch {len(batch)}, {batch.shape[-1]} px", rate >= TARGETS["macenko_img_s"]
                if c.cuda else None, rate, target=f">= {TARGETS['macenko_img_s']:,} img/s")]


def stage_bench(c: Check) -> list[dict]:
    import bench
    base = ["--data-root", c.args.data_root, "--device", c.device.type]
    results = {}
    for name, extra in (("plain", ["--stages", "model_step,loop,train"]), ("compiled", ["--compile", "--stages",
                                                                                          "model_step"])):
        if name == "compiled" and not c.cuda:
            continue
        out = c.scratch / f"bench-{name}.json"
        with quiet():
            if bench.main([*base, *extra, "--json", str(out)]) != 0:
                raise RuntimeError(f"tools/bench.py {name} failed")
        results[name] = json.loads(out.read_text())
    r, gpu = results["plain"], c.cuda
    ceiling = r["stages"].get("model_step")
    epoch = r["projected_epoch_s"].get("loop")
    rows = [row("bench: model step alone (the ceiling)", True, ceiling, 1.0, note=r["feed"] or ""),
            row("bench: loop (cache on the device)", r["loop_fraction_of_ceiling"] >= TARGETS["loop"] if gpu else None,
                r["stages"].get("loop"), r["loop_fraction_of_ceiling"], f">= {TARGETS['loop']:.2f} x ceiling"),
            row("bench: train.py steady state", r["train_fraction_of_ceiling"] >= TARGETS["train"] if gpu else None,
                r["stages"].get("train"), r["train_fraction_of_ceiling"], f">= {TARGETS['train']:.2f} x ceiling"),
            row("bench: a 54,000-patch epoch, projected from the loop", epoch <= TARGETS["epoch_s"] if gpu and epoch
                else None, target=f"<= {TARGETS['epoch_s']:g} s", note="-" if epoch is None else f"{epoch:.1f} s")]
    if "compiled" in results:
        rate = results["compiled"]["stages"].get("model_step")
        rows.append(row("bench: --compile model step", rate >= TARGETS["compile_img_s"], rate,
                        bench.ratio(rate, ceiling), f">= {TARGETS['compile_img_s']:,} img/s"))
    return rows


def stage_encoder(c: Check) -> list[dict]:
    import stain
    from helico import encoders
    name = f"encoder: ViT-L/16 at 224 px, {'bf16' if c.cuda else 'float32'}"
    try:
        enc = encoders.untrained("uni", c.device)
    except common.DataError as e:
        return [row(name, None, target=f">= {TARGETS['encoder_img_s']:,} img/s", note=str(e))]
    batch = torch.rand(256 if c.cuda else 2, 3, 256, 256, device=c.device)
    with torch.inference_mode(), torch.autocast(c.device.type, dtype=torch.bfloat16, enabled=c.cuda):
        enc(batch[:2])  # warm-up
        seconds = sorted(stain._timed(lambda: enc(batch), c.device)[0] for _ in range(5))[2]
    rate = len(batch) / seconds
    return [row(f"{name}, batch {len(batch)}", rate >= TARGETS["encoder_img_s"] if c.cuda else None, rate,
                target=f">= {TARGETS['encoder_img_s']:,} img/s")]


# ----------------------------------------------------------------------------------------------- table
def table(rows: list[dict], card: str) -> str:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    lines = [f"gpu_check on {card}", "| stage | img/s | x ceiling | target | result | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        result = {True: "pass", False: "FAIL", None: "n/a"}[r["ok"]]
        lines.append(f"| {r['stage']} | {fmt(r['img_s'], ',.0f')} | {fmt(r['x_ceiling'], '.2f')} | {r['target']} | "
                     f"{result} | {r['note']} |")
    return "\n".join(lines)


def card_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU (plumbing only, no measurement)"


def get_args_parser():
    p = argparse.ArgumentParser(description="Run every CUDA-only branch end to end on demo data and measure the "
                                "throughput targets; one table (about 5 minutes on one GPU). Needs CUDA.",
                                formatter_class=common.HelpFormatter, allow_abbrev=False,
                                epilog="exit codes: 0 all passed, 1 a check failed, 2 no CUDA or bad input")
    p.add_argument("--data-root", default="demo_data", help="a demo dataset (make_demo_data.py DIR --seed 0)")
    common.add_device_flag(p, default="cuda", note="cpu only checks this script's plumbing")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--json", metavar="OUT", help="also write the table and every number here")
    p.add_argument("--keep", metavar="DIR", help="keep the runs, caches and evaluations here (default: deleted)")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        print(f"error: --stages {args.stages}: unknown {', '.join(unknown)} (choose from {', '.join(STAGES)})",
              file=sys.stderr)
        return common.EXIT_BAD_INPUT
    if args.device != "cpu" and not torch.cuda.is_available():
        print("error: gpu_check needs CUDA and no GPU is visible to this process (--device cpu checks only the "
              "script)", file=sys.stderr)
        return common.EXIT_BAD_INPUT
    if not (Path(args.data_root) / "CrossValidation").is_dir():
        print(f"error: --data-root {args.data_root}: no demo dataset (python make_demo_data.py {args.data_root} "
              f"--seed 0)", file=sys.stderr)
        return common.EXIT_BAD_INPUT
    try:
        device = common.resolve_device(args.device)
    except common.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return common.EXIT_BAD_INPUT
    args.device, args.data_root = str(device), str(Path(args.data_root).absolute())
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        scratch = Path(args.keep).absolute() if args.keep else Path(tmp)
        scratch.mkdir(parents=True, exist_ok=True)
        check, rows = Check(args, scratch), []
        for name in stages:
            start = time.perf_counter()
            print(f"gpu_check: {name}", file=sys.stderr, flush=True)
            try:
                rows += globals()[f"stage_{name}"](check)
            except Exception as e:  # a crashed stage is a failed row; the others still run
                rows.append(row(name, False, note=f"crashed: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
                                if str(e) else f"crashed: {type(e).__name__}"))
            print(f"gpu_check: {name} done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    card = card_name(device)
    print(table(rows, card))
    if args.json:
        common.atomic_write_text(args.json, json.dumps({"card": card, "torch": torch.__version__, "rows": rows},
                                                       indent=1) + "\n")
    return common.EXIT_OK if all(r["ok"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
