"""The project's GPU check: a tiny end-to-end run with every role on CUDA in bf16-mixed.

Run through ``scripts/gpu_check.sh`` (which installs first). In order, each timed:

1. the converter on a tiny checkpoint in the released model's layout (``tests/official_layout.py``),
   then ``rlrestore restore`` of two faces with the converted policy on the GPU in bf16;
2. Stage 1 (autoencoder, 1.1, 1.2) as a Ray Train job whose worker holds a GPU fraction;
3. Stage 2 with 2 rollout actors, 1 reward actor and 1 learner rank sharing the GPU;
4. ``rlrestore eval`` of F against Q on one GPU eval actor;
5. when vLLM is importable and CUDA is there: the semantic codes of a random-init integrator (hidden
   512, 8 layers, 4,096 codes, 256 per input) decoded greedily by the hf loop and by vLLM
   (``policy.ar_backend``) from the same prompts, in bf16: the fraction of codes that agree, the
   fraction before the first disagreement, and codes/s of each. Without vLLM it says why it skipped
   (not a failure of the check).

It prints every ``devices.json`` (role, actor, node, device, dtype), the step times (Stage 1
``step_time``, Stage 2 ``timing/*``) and the peak GPU memory (``nvidia-smi`` sampled every 0.25 s), and
writes them to ``OUT/gpu_check.json``. ``--device cpu`` runs the same sequence on the CPU (a
dry run of the script itself on a machine without a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Self

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY = REPO / "rlrestore" / "configs" / "tiny.yaml"
# One GPU shared by every role: fractions that add up to at most 1 per phase.
STAGE1 = ["ray.train_workers.num_actors=1", "autoencoder.steps=60", "stage1_1.steps=20", "stage1_2.steps=40"]
STAGE2 = [
    "stage2.steps=6", "stage2.outputs.checkpoint_every=3", "stage2.outputs.sample_grid_every=3",
    "stage2.resources.rollout.num_actors=2", "stage2.resources.learner.num_actors=1",
]  # fmt: skip
GPU_SHARES = [
    "ray.train_workers.num_gpus=0.5", "stage2.resources.rollout.num_gpus=0.25",
    "stage2.resources.reward.num_gpus=0.1", "stage2.resources.learner.num_gpus=0.4",
    "eval.actors.num_actors=1", "eval.actors.num_gpus=0.5",
]  # fmt: skip


class GpuMemory:
    """Peak of ``nvidia-smi``'s used memory (MiB) while it runs, sampled in a thread."""

    def __init__(self) -> None:
        self.peak_mib = 0
        self.available = shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            out = subprocess.run(query, capture_output=True, text=True, check=False).stdout.split()
            self.peak_mib = max([self.peak_mib, *(int(value) for value in out if value.isdigit())])
            self._stop.wait(0.25)

    def __enter__(self) -> Self:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.available:
            self._thread.join()


def run(step: str, args: list[str], log: Path, timings: dict[str, float]) -> None:
    """One CLI command in its own process (as a user runs it); its output goes to ``log``."""
    began = time.perf_counter()
    with log.open("a") as stream:
        stream.write(f"\n$ rlrestore {' '.join(args)}\n")
        stream.flush()
        proc = subprocess.run(
            [sys.executable, "-m", "rlrestore", *args], cwd=REPO, stdout=stream, stderr=subprocess.STDOUT,
            check=False, env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
    timings[step] = round(time.perf_counter() - began, 1)
    print(f"  {step}: {'ok' if proc.returncode == 0 else f'FAILED ({proc.returncode})'} in {timings[step]} s")
    if proc.returncode != 0:
        print(log.read_text()[-4000:])
        raise SystemExit(f"gpu check: {step} failed; the whole log is {log}")


def convert_and_restore(out: Path, device: str, log: Path, timings: dict[str, float]) -> None:
    from tests.official_layout import write_official_checkpoint

    layout = write_official_checkpoint(out / "official")
    faces = REPO / "rlrestore" / "assets" / "faces"
    inputs = sorted(faces.glob("*.png"))[:2]
    run("convert", ["convert", "pref-restore", str(layout.checkpoint), "--out", str(out / "converted")], log, timings)
    restore = ["restore", "--ckpt", str(out / "converted"), "--out", str(out / "restored"), *map(str, inputs)]
    run("restore", [*restore, "--device", device, "--precision", "bf16-mixed", "--quiet"], log, timings)


AR_ARCH = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8,
           "num_key_value_heads": 4, "head_dim": 64, "max_position_embeddings": 2048, "tie_word_embeddings": True}


def _best_time(fn, repeats: int, cuda: bool) -> tuple[object, float]:
    """fn()'s result and its fastest wall time over ``repeats`` calls (after one warm-up call)."""
    import torch

    result, best = fn(), float("inf")
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        began = time.perf_counter()
        result = fn()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - began)
    return result, best


def compare_ar_backends(device: str, out: Path, arch: dict | None = None, codebook: int = 4096, grid: int = 256,
                        inputs: int = 16, repeats: int = 2) -> dict:  # fmt: skip
    """Greedy codes of the hf loop against vLLM on one random-init integrator, or why it was skipped."""
    import torch

    from rlrestore.config import PolicyConfig, SamplerConfig, VLLMOptions
    from rlrestore.models.text_tokenizer import Vocabulary, load_text_tokenizer
    from rlrestore.policies.prefrestore import ar_backends
    from rlrestore.policies.prefrestore.integrator import SemanticIntegrator
    from rlrestore.policies.prefrestore.networks import build_integrator

    reason = ar_backends.unavailable_reason(torch.device(device))
    if reason is not None:
        return {"skipped": reason}
    cuda, dtype = device.startswith("cuda"), torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    vocabulary = Vocabulary(load_text_tokenizer(None), codebook)
    integrator = build_integrator({**(arch or AR_ARCH), "vocab_size": vocabulary.size}).to(device, dtype).eval()
    semantic = SemanticIntegrator(integrator, vocabulary, PolicyConfig(codebook_size=codebook), grid)
    lq_codes = torch.randint(0, codebook, (inputs, grid), generator=torch.Generator().manual_seed(0))
    ids, mask = semantic.prompt_batch(lq_codes, [""] * inputs)
    greedy, generator = SamplerConfig(), torch.Generator()
    hf, hf_s = _best_time(lambda: semantic.generate_codes_hf(ids, mask, greedy, generator), repeats, cuda)
    engine = ar_backends.VLLMCodeGenerator(VLLMOptions(export_dir=str(out / "vllm-export")))
    began = time.perf_counter()
    engine.engine_for(integrator)
    build_s = time.perf_counter() - began
    decode = lambda: engine.generate(integrator, vocabulary, grid, ids, mask, greedy, generator)
    vllm, vllm_s = _best_time(decode, repeats, cuda)
    same = (hf == vllm).cpu()
    first_diff = torch.where(same.all(1), grid, (~same).int().argmax(1))
    return {
        "integrator_params_m": round(sum(p.numel() for p in integrator.parameters()) / 1e6, 1),
        "dtype": str(dtype).removeprefix("torch."), "inputs": inputs, "codes_per_input": grid,
        "agreement": round(float(same.float().mean()), 4),
        "agreement_before_first_difference": round(float(first_diff.float().mean()) / grid, 4),
        "inputs_identical": int(same.all(1).sum()),
        "hf_codes_per_s": round(inputs * grid / hf_s, 1), "vllm_codes_per_s": round(inputs * grid / vllm_s, 1),
        "vllm_speedup": round(hf_s / vllm_s, 2), "vllm_engine_build_s": round(build_s, 1),
    }  # fmt: skip


def ar_backend_step(out: Path, device: str, timings: dict[str, float]) -> dict:
    """Step 5, printed; an error is reported (and fails the check at the end), a skip is not."""
    began = time.perf_counter()
    try:
        figures = compare_ar_backends(device, out)
    except Exception as exc:  # noqa: BLE001 - reported, the other steps' figures still count
        figures = {"error": f"{type(exc).__name__}: {exc}"}
    timings["ar_backends"] = round(time.perf_counter() - began, 1)
    if "skipped" in figures:
        print(f"  vllm vs hf codes: skipped ({figures['skipped']})")
    elif "error" in figures:
        print(f"  vllm vs hf codes: FAILED: {figures['error']}")
    else:
        print(f"  vllm vs hf codes: ok in {timings['ar_backends']} s: {json.dumps(figures)}")
    return figures


def step_times(run_dir: Path) -> dict[str, dict[str, float]]:
    """Median step time of each Stage 1 stage and median Stage 2 phase timings, in seconds."""
    from rlrestore.tracking import read_metrics

    figures: dict[str, dict[str, float]] = {}
    for stage in ("autoencoder", "stage1.1", "stage1.2"):
        frame = read_metrics(run_dir, stage)
        figures[stage] = {"step_time": round(float(frame["step_time"].median()), 4)}
    frame = read_metrics(run_dir, "stage2")
    columns = [c for c in frame.columns if c.startswith("timing/") or c == "learn/step_time"]
    figures["stage2"] = {c: round(float(frame[c].median()), 4) for c in columns}
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check", help="Output folder (default ./gpu_check).")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a dry run without a GPU.")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log, timings = out / "gpu_check.log", {}
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU {gpu}")
    if args.device == "cuda" and gpu is None:
        raise SystemExit("gpu check: CUDA is not available (use --device cpu for a dry run)")
    run_dir = out / "run"
    common = [f"run_dir={run_dir}", "precision=bf16-mixed", f"device={args.device}", "logging.progress=false"]
    common += GPU_SHARES if args.device == "cuda" else []
    with GpuMemory() as memory:
        convert_and_restore(out, args.device, log, timings)
        run("stage1", ["train", "stage1", str(TINY), *common, *STAGE1], log, timings)
        run("stage2", ["train", "stage2", str(TINY), *common, *STAGE1, *STAGE2], log, timings)
        from rlrestore.checkpoints import latest_checkpoint

        ckpts = [f"--ckpt=F={latest_checkpoint(run_dir, 'stage1.2')}", f"--ckpt=Q={run_dir}"]
        evaluate = ["eval", str(TINY), *ckpts, "--data", str(REPO / "rlrestore" / "assets" / "faces")]
        metrics = ["eval.metrics=[psnr,ssim,sharpness]", "eval.chunk_size=8"]
        run("eval", [*evaluate, "--out", str(out / "eval"), *common, *STAGE1, *metrics], log, timings)
        ar_backends = ar_backend_step(out, args.device, timings)
    devices = {
        "run": json.loads((run_dir / "devices.json").read_text()),
        "restore": json.loads((out / "restored" / "devices.json").read_text()),
        "eval": json.loads((out / "eval" / "devices.json").read_text()),
    }
    report = {"gpu": gpu, "torch": torch.__version__, "wall_s": timings, "step_times_s": step_times(run_dir),
              "peak_gpu_memory_mib": memory.peak_mib if memory.available else None, "devices": devices,
              "ar_backends": ar_backends}  # fmt: skip
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    for name, records in devices.items():
        for record in records:
            where = f"{record['device']} {','.join(record.get('gpu_ids') or [])}".strip()
            print(f"  {name:8s} {record['stage']:10s} {record['role']:10s} {record['actor']:12s} {where:10s} "
                  f"{record['precision']:11s} {record['dtype']}")  # fmt: skip
    print(json.dumps({"step_times_s": report["step_times_s"], "peak_gpu_memory_mib": report["peak_gpu_memory_mib"]},
                     indent=2))  # fmt: skip
    if "error" in ar_backends:
        print(f"gpu check FAILED at the vllm vs hf step: {ar_backends['error']} ({out / 'gpu_check.json'})")
        return 1
    print(f"gpu check passed: {out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
