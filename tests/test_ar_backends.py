"""policy.ar_backend=vllm around vLLM's API: prompts, sampling parameters, code mapping, the export
of the integrator, the errors and the fallback, and the whole generate path with a fake engine
(``tests/fake_vllm.py``) that implements vLLM's documented interface. vLLM itself is not installed here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlrestore.config import DegradationConfig, PolicyConfig, SamplerConfig, VLLMOptions
from rlrestore.data import build_shards, embedded_faces_dir
from rlrestore.policies import load_policy
from rlrestore.policies.prefrestore import ar_backends
from rlrestore.policies.prefrestore.ar_backends import (
    VLLMUnavailableError,
    codes_from_outputs,
    export_integrator,
    input_seeds,
    integrator_fingerprint,
    prompt_token_lists,
    sampling_arguments,
)
from rollouts import RolloutWorker
from tests import fake_vllm
from tests.conftest import build_tiny_policy, tiny_config
from tests.test_official_conventions import OFFICIAL

LAYOUTS = {"plain": (), "official": OFFICIAL}
SAMPLED = SamplerConfig(ar_sampling="sample", ar_top_k=40, ar_top_p=0.9, ar_temperature=1.3)
ROOT = Path(__file__).resolve().parents[1]
VLLM_MISSING = importlib.util.find_spec("vllm") is None or not torch.cuda.is_available()


def lq_faces(policy, count: int = 2) -> torch.Tensor:
    side = policy.config.resolution
    return torch.rand(count, 3, side, side, generator=torch.Generator().manual_seed(3)) * 2 - 1


@pytest.fixture
def fake_engine(monkeypatch, tmp_path):
    """vLLM 'installed' with a CUDA device: the fake API, the export folder in tmp_path."""
    monkeypatch.setattr(ar_backends, "import_vllm", fake_vllm.fake_api)
    monkeypatch.setattr(ar_backends, "unavailable_reason", lambda device=None: None)
    fake_vllm.LLM.instances.clear()
    return ["policy.ar_backend=vllm", f"policy.vllm.export_dir={tmp_path / 'export'}"]


# ----------------------------------------------------------------------------- requests
@pytest.mark.parametrize("layout", LAYOUTS)
def test_prompts_are_the_unpadded_prompt_ids_of_each_input(layout: str) -> None:
    policy = build_tiny_policy(0, *LAYOUTS[layout])
    codes = policy.visual_tokenizer(policy.to_tokenizer_size(lq_faces(policy, 3)))
    captions = ["", "a smiling woman with long hair", "x"]
    ids, mask = policy.semantic.prompt_batch(codes, captions)
    assert not bool(mask.all())  # captions of different length: left padding to strip
    config, vocab = policy.config, policy.vocabulary
    for row, (prompt, caption) in enumerate(zip(prompt_token_lists(ids, mask), captions, strict=True)):
        template = config.caption_prompt.replace("{caption}", caption) if caption else config.prompt
        assert prompt == vocab.prompt_ids(
            template, codes[row].tolist(), config.prompt_format, config.system_prompt
        )
        assert prompt[-2:] == [vocab.im_start, vocab.scales[0]]
        assert len(prompt) == int(mask[row].sum())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sampling_arguments_allow_exactly_the_image_tokens(layout: str) -> None:
    policy = build_tiny_policy(0, *LAYOUTS[layout])
    vocab, n = policy.vocabulary, policy.num_semantic_tokens
    greedy = fake_vllm.SamplingParams(**sampling_arguments(SamplerConfig(), vocab, n, None))
    assert greedy.allowed_token_ids == list(range(vocab.first_image_id, vocab.size))
    assert len(greedy.allowed_token_ids) == policy.config.codebook_size
    assert vocab.im_end not in greedy.allowed_token_ids and vocab.pad not in greedy.allowed_token_ids
    assert (greedy.max_tokens, greedy.min_tokens, greedy.ignore_eos, greedy.detokenize) == (n, n, True, False)
    assert (greedy.temperature, greedy.seed, greedy.n) == (0.0, None, 1)
    sampled = fake_vllm.SamplingParams(**sampling_arguments(SAMPLED, vocab, n, 1234))
    assert (sampled.temperature, sampled.top_k, sampled.top_p, sampled.seed) == (1.3, 40, 0.9, 1234)
    wide = SamplerConfig(
        ar_sampling="sample", ar_top_k=1200
    )  # the released top-k over a 1,024-code tiny book
    assert sampling_arguments(wide, vocab, n, 0)["top_k"] == policy.config.codebook_size


def test_temperatures_vllm_refuses_are_named() -> None:
    vocab = build_tiny_policy().vocabulary
    with pytest.raises(ValueError, match=r"sampler.ar_temperature=2.5.*policy.ar_backend=hf"):
        sampling_arguments(SamplerConfig(ar_sampling="sample", ar_temperature=2.5), vocab, 4, 0)


def test_seeds_one_per_input_and_none_when_greedy() -> None:
    generator = torch.Generator().manual_seed(7)
    state = generator.get_state()
    assert input_seeds(SamplerConfig(), 3, generator) == [None, None, None]
    assert torch.equal(generator.get_state(), state)  # greedy leaves the generator to what follows
    seeds = input_seeds(SAMPLED, 4, generator)
    assert len(set(seeds)) == 4 and all(isinstance(s, int) and 0 <= s < 2**31 for s in seeds)
    assert input_seeds(SAMPLED, 4, torch.Generator().manual_seed(7)) == seeds


def test_generated_ids_map_back_to_codes_and_bad_outputs_are_refused() -> None:
    vocab = build_tiny_policy().vocabulary
    first = vocab.first_image_id

    def output(ids):
        return SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids)])

    codes = codes_from_outputs([output([first + 5, first, first + 1023]), output([first + 1] * 3)], vocab, 3)
    assert codes.tolist() == [[5, 0, 1023], [1, 1, 1]] and codes.dtype == torch.long
    with pytest.raises(RuntimeError, match="2 tokens for input 0, expected 3"):
        codes_from_outputs([output([first, first])], vocab, 3)
    with pytest.raises(RuntimeError, match="outside the image tokens"):
        codes_from_outputs([output([first, first - 1, first])], vocab, 3)


# ----------------------------------------------------------------------------- errors and fallback
@pytest.mark.skipif(not VLLM_MISSING, reason="vLLM and CUDA are here")
def test_vllm_where_it_cannot_run_is_an_error_at_load(tmp_path) -> None:
    with pytest.raises(VLLMUnavailableError, match=r"policy.ar_backend=vllm, but .*install vLLM \(the `vllm` extra"):
        build_tiny_policy(0, "policy.ar_backend=vllm")
    build_tiny_policy().save_pretrained(tmp_path / "policy")
    runtime = PolicyConfig(ar_backend="vllm").runtime_options()
    with pytest.raises(VLLMUnavailableError, match="policy.vllm.fallback=hf"):
        load_policy(tmp_path / "policy", runtime)


@pytest.mark.skipif(not VLLM_MISSING, reason="vLLM and CUDA are here")
def test_fallback_to_hf_warns_and_decodes_as_hf() -> None:
    hf = build_tiny_policy(0)
    with pytest.warns(RuntimeWarning, match="decoding with the hf backend"):
        fallback = build_tiny_policy(0, "policy.ar_backend=vllm", "policy.vllm.fallback=hf")
    assert fallback.semantic.vllm is None and fallback.config.ar_backend == "vllm"
    lq = lq_faces(hf)
    a = hf.condition(lq, ["", ""], SAMPLED, torch.Generator().manual_seed(1))
    b = fallback.condition(lq, ["", ""], SAMPLED, torch.Generator().manual_seed(1))
    assert torch.equal(a.codes, b.codes) and torch.equal(a.semantic, b.semantic)


def test_runtime_options_are_not_stored_but_applied_on_load(tmp_path, fake_engine) -> None:
    policy = build_tiny_policy(0, *fake_engine)
    assert policy.semantic.vllm is not None
    policy.save_pretrained(tmp_path / "policy")
    stored = json.loads((tmp_path / "policy" / "policy_config.json").read_text())["policy"]
    assert stored["ar_backend"] == "hf" and stored["vllm"] == VLLMOptions().model_dump()
    assert load_policy(tmp_path / "policy").semantic.vllm is None
    runtime = policy.config.runtime_options()
    loaded = load_policy(tmp_path / "policy", runtime)
    assert loaded.config.ar_backend == "vllm" and loaded.semantic.vllm is not None
    assert loaded.semantic.vllm.options == policy.config.vllm
    assert load_policy(tmp_path / "policy", {**runtime, "type": "flow_unet"}).semantic.vllm is None
    with pytest.raises(ValueError, match="ar_backend"):
        load_policy(tmp_path / "policy", {**runtime, "ar_backend": "trt"})


# ----------------------------------------------------------------------------- the generate path
@pytest.mark.parametrize("layout", LAYOUTS)
def test_vllm_codes_flow_into_the_teacher_forced_pass(layout: str, fake_engine) -> None:
    hf, vllm = build_tiny_policy(0, *LAYOUTS[layout]), build_tiny_policy(0, *LAYOUTS[layout], *fake_engine)
    lq, captions = lq_faces(hf), ["", "a man"]
    a = hf.condition(lq, captions, SamplerConfig(), torch.Generator().manual_seed(1))
    b = vllm.condition(lq, captions, SamplerConfig(), torch.Generator().manual_seed(1))
    assert torch.equal(a.codes, b.codes)  # greedy: the exported folder decodes as the policy's integrator
    assert torch.equal(a.semantic, b.semantic) and torch.equal(a.z_low, b.z_low)
    (engine,) = fake_vllm.LLM.instances
    assert engine.kwargs["skip_tokenizer_init"] and engine.kwargs["dtype"] == "float32"
    assert engine.kwargs["gpu_memory_utilization"] == 0.3
    ((prompts, params),) = engine.calls
    ids, mask = vllm.semantic.prompt_batch(vllm.visual_tokenizer(vllm.to_tokenizer_size(lq)), captions)
    assert [p["prompt_token_ids"] for p in prompts] == prompt_token_lists(ids, mask)
    assert all(p.max_tokens == p.min_tokens == vllm.num_semantic_tokens for p in params)
    # The same codes teacher-forced by hand give the same condition.
    forced = hf.conditioning(lq, captions, target_codes=b.codes).condition
    assert torch.equal(forced.semantic, b.semantic)


def test_sampled_codes_are_seeded_per_input(fake_engine) -> None:
    policy = build_tiny_policy(0, *fake_engine)
    lq = lq_faces(policy).repeat(2, 1, 1, 1)  # inputs 0 and 2 are the same face
    first = policy.condition(lq, [""] * 4, SAMPLED, torch.Generator().manual_seed(5)).codes
    again = policy.condition(lq, [""] * 4, SAMPLED, torch.Generator().manual_seed(5)).codes
    other = policy.condition(lq, [""] * 4, SAMPLED, torch.Generator().manual_seed(6)).codes
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert not torch.equal(first[0], first[2])  # same face, its own seed
    (_, params), *_ = fake_vllm.LLM.instances[0].calls
    assert len({p.seed for p in params}) == 4 and {p.top_k for p in params} == {40}


# ----------------------------------------------------------------------------- the exported folder
def test_export_once_per_fingerprint(tmp_path) -> None:
    integrator = build_tiny_policy().integrator
    fingerprint = integrator_fingerprint(integrator)
    folder = export_integrator(integrator, tmp_path, fingerprint)
    assert {"config.json", "model.safetensors", "rlrestore_export.json"} <= {p.name for p in folder.iterdir()}
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert export_integrator(integrator, tmp_path, fingerprint) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten
    with torch.no_grad():
        integrator.model.norm.weight.add_(0.5)
    changed = integrator_fingerprint(integrator)
    assert changed != fingerprint and export_integrator(integrator, tmp_path, changed) != folder
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_integrator_changed_after_the_engine_was_built_is_refused(fake_engine) -> None:
    policy = build_tiny_policy(0, *fake_engine)
    lq = lq_faces(policy)
    policy.condition(lq, ["", ""], SamplerConfig(), torch.Generator())
    policy.integrator.load_state_dict(policy.integrator.state_dict())  # same weights written again: fine
    policy.condition(lq, ["", ""], SamplerConfig(), torch.Generator())
    with torch.no_grad():
        policy.integrator.model.norm.weight.mul_(1.1)
    with pytest.raises(RuntimeError, match="decodes a frozen integrator.*ar_backend=hf"):
        policy.condition(lq, ["", ""], SamplerConfig(), torch.Generator())
    assert len(fake_vllm.LLM.instances) == 1


# ----------------------------------------------------------------------------- scripts/gpu_check.py step 5
def gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_AR = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}


@pytest.mark.skipif(not VLLM_MISSING, reason="vLLM and CUDA are here")
def test_gpu_check_skips_the_vllm_step_and_says_why(tmp_path, capsys) -> None:
    timings: dict[str, float] = {}
    figures = gpu_check_module().ar_backend_step(tmp_path, "cpu", timings)
    assert set(figures) == {"skipped"} and "ar_backends" in timings
    assert f"vllm vs hf codes: skipped ({figures['skipped']})" in capsys.readouterr().out


def test_gpu_check_compares_hf_and_vllm_codes(tmp_path, fake_engine) -> None:
    figures = gpu_check_module().compare_ar_backends(
        "cpu", tmp_path, TINY_AR, codebook=64, grid=12, inputs=3, repeats=1
    )
    assert (
        figures["agreement"] == figures["agreement_before_first_difference"] == 1.0
    )  # the same model decoded
    assert (
        figures["inputs_identical"] == 3 and figures["vllm_codes_per_s"] > 0 and figures["hf_codes_per_s"] > 0
    )
    (engine,) = fake_vllm.LLM.instances
    assert engine.model_path.parent == tmp_path / "vllm-export"


def test_a_rollout_worker_decodes_with_the_run_configs_backend(tmp_path, fake_engine) -> None:
    build_tiny_policy(0).save_pretrained(tmp_path / "policy")  # stores ar_backend=hf
    build_shards(embedded_faces_dir(), tmp_path / "shards", image_size=64, shard_size=32, progress=False)
    args = {"policy_dir": str(tmp_path / "policy"), "shards": str(tmp_path / "shards"),
            "degradation": DegradationConfig().model_dump(mode="json"), "data_seed": 3, "holdout": 4}  # fmt: skip
    runtime = tiny_config("unused", *fake_engine).policy.runtime_options()  # what Stage 2 hands its actors
    seeds, sampler = torch.tensor([[1, 2], [3, 4]]), SamplerConfig(steps=2)
    hf = RolloutWorker(**args).rollout([0, 5], epoch=0, seeds=seeds, sampler=sampler)
    assert not fake_vllm.LLM.instances
    vllm = RolloutWorker(**args, policy_runtime=runtime).rollout([0, 5], epoch=0, seeds=seeds, sampler=sampler)
    (engine,) = fake_vllm.LLM.instances
    assert len(engine.calls) == 1 and len(engine.calls[0][0]) == 2  # one AR decode per input, not per candidate
    assert torch.equal(hf.condition.codes, vllm.condition.codes) and torch.equal(hf.x0, vllm.x0)
