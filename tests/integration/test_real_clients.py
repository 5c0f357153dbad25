"""Real clients get what the acceleration section asks for.

TRL's ``SFTTrainer`` given the model as a path with a peft ``LoraConfig``
(``tests/integration/scripts/real_client_worker.py``), under stock ``accelerate launch --config_file
launch_configs/accelerate-cpu-qlora-foak.yaml``, must train a 4-bit model (the section's bitsandbytes plugin loads
it) with fused kernels, print the patch table once after the model's prepare, and match the loss trajectory of the
framework-API path of the same config. The user-facing examples (``examples/trl_sft.py`` with a path or a model it
loaded, ``examples/hf_trainer.py``, ``examples/accelerate_loop.py``) run with every configuration they claim in
``test_examples.py``.

The in-process tests cover the pieces: the routing of ``from_pretrained`` (recorded, reverted), one model one
framework, the checks at ``prepare``, the patch table, and missing model paths.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from fms_acceleration_accelerate import AccelerationConfigError, AccelerationFramework
from fms_acceleration_accelerate import accelerate_integration as ai
from fms_acceleration_accelerate.framework import framework_of

from .conftest import ACCELERATE, REPO, SCRIPTS, free_port, run
from .test_launch import needs_hook
from .tiny_models import WORD_TOKENIZER_IDS, tiny_llama

WORKER = str(SCRIPTS / "real_client_worker.py")
CPU_QLORA = REPO / "launch_configs" / "accelerate-cpu-qlora-foak.yaml"
BNB = {"peft": {"quantization": {"bitsandbytes": {"quant_type": "nf4"}}}}
FUSED_LORA = {"training": {"fused_ops_and_kernels": {"fused_lora": True}}}
PROJECTIONS = 7  # q, k, v, o, gate, up, down per decoder layer
LAYERS = 2
ROUTED = re.compile(r"fms-acceleration: \w+\.from_pretrained\(.*\) loads through plugin 'bitsandbytes'")
TABLE = "fms-acceleration patches:"


def _bitsandbytes_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _bitsandbytes_available(), reason="bitsandbytes is not installed")


def save_tiny_llama(folder: Path) -> Path:
    """The test model: Llama, hidden 64, 2 layers, vocab 256 (dims multiples of 64, so 4-bit blocks divide them)."""
    return tiny_llama(folder, 256, num_hidden_layers=LAYERS, **WORD_TOKENIZER_IDS)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def client_env(tmp_path: Path) -> dict[str, str]:
    """A clean environment for launched scripts (no section of ours inherited, kernels' CPU references as the
    README runs them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FMS_ACCELERATION")}
    for key in (
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "ACCELERATE_USE_CPU",
        "TRITON_INTERPRET",
    ):
        env.pop(key, None)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")  # and no checkout folder on PYTHONPATH: installed packages only
    return env


def launch_client(mode: str, model: Path, tmp_path: Path, env: dict[str, str], *extra: str, config: Path = CPU_QLORA):
    out = tmp_path / f"{mode}.json"
    done = run(
        [ACCELERATE, "launch", "--config_file", str(config), "--main_process_port", str(free_port()), WORKER,
         "--mode", mode, "--model", str(model), "--out", str(out), *extra],
        env, tmp_path, timeout=300,
    )  # fmt: skip
    report = json.loads(out.read_text()) if out.exists() else None
    return done, report


def check_qlora_run(done, report) -> None:
    """A 4-bit model with LoRA over its 4-bit layers trained, with fused kernels, and learned; the patch table was
    printed once, after the load was routed and before the first step."""
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    model = report["before_train"]
    assert model["four_bit_layers"] == PROJECTIONS * LAYERS
    assert model["four_bit_kinds"] == ["Linear4bit:nf4"]
    assert model["lora_layers"] == 4 * LAYERS and model["lora_bases"] == ["Linear4bit"]
    assert model["trainable"] == 2 * 4 * LAYERS and model["trainable_not_lora"] == []
    assert report["after_train"]["four_bit_layers"] == PROJECTIONS * LAYERS
    assert report["accelerator_plugins"] == ["bitsandbytes", "fused_ops_and_kernels"]
    losses = report["losses"]
    assert len(losses) == 6 and all(v == v for v in losses)
    assert losses[-1] < losses[0] and min(losses[-3:]) < losses[0] - 0.1
    out = done.stdout
    assert "no patches applied" not in out
    assert out.count(TABLE) == 1
    table = out[out.index(TABLE) :]
    assert "kernels.lora_qkv [bnb_4bit] (lora)" in table and "kernels.lora_mlp_" in table
    assert "kernels.rms_norm" in table


# --------------------------------------------------------------------------------------------- launched clients


@pytest.mark.slow
@needs_hook
def test_sft_trainer_given_a_path_trains_the_4bit_model_and_matches_the_framework_api(model_dir, tmp_path, client_env):
    done, sft = launch_client("sft-path", model_dir, tmp_path, client_env)
    check_qlora_run(done, sft)
    assert len(ROUTED.findall(done.stdout)) == 1  # TRL's from_pretrained went through the plugin, said once
    assert done.stdout.index(TABLE) > ROUTED.search(done.stdout).start()

    # the framework-API path of the same config, in a script launched with that same config: the script's own
    # framework loads and augments, and Accelerator.prepare recognises it (nothing is patched twice)
    done, api = launch_client("framework-api", model_dir, tmp_path, client_env, "--framework-config", str(CPU_QLORA))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    assert api["accelerator_uses_own_framework"] is True
    assert "its plugins run the prepare hooks" in done.stdout
    assert not ROUTED.search(done.stdout)  # the script's framework loaded the model itself
    assert api["before_train"]["four_bit_layers"] == PROJECTIONS * LAYERS
    # Same 4-bit weights (one loader, deterministic nf4 quantization of the same checkpoint), LoRA A drawn from the
    # same RNG state (seeded before the load in both), the same kernels, the same batches: the trajectories agree
    # to float32 round-off (observed identical); only where LoRA is added (TRL's get_peft_model vs the plugin's
    # augmentation) and when the kernels are patched (prepare vs augmentation) differ.
    assert api["losses"] == pytest.approx(sft["losses"], rel=1e-5, abs=1e-5)


@pytest.mark.slow
@needs_hook
def test_script_framework_with_another_config_is_refused_at_prepare(model_dir, tmp_path, client_env):
    own = tmp_path / "bnb-only.yaml"
    own.write_text("plugins:\n  peft:\n    quantization:\n      bitsandbytes: {quant_type: nf4}\n", encoding="utf-8")
    done, report = launch_client("framework-api", model_dir, tmp_path, client_env, "--framework-config", str(own))
    assert done.returncode != 0 and report is None
    err = done.stderr
    assert "AccelerationConfigError" in err and "both would patch the same model" in err
    assert f"config {own}: bitsandbytes()" in err  # the script's config ...
    assert f"the acceleration section of {CPU_QLORA}" in err  # ... and the launched one, both named
    assert "remove the acceleration section" in err


# --------------------------------------------------------------------------------------------- in process


def _original_from_pretrained():
    from transformers.modeling_utils import PreTrainedModel

    return vars(PreTrainedModel)["from_pretrained"]


def _four_bit(model) -> int:
    return sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit" and "bitsandbytes" in type(m).__module__)


def test_routed_load_is_recorded_reused_by_the_accelerator_and_reverted(fresh_install, model_dir):
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    original = _original_from_pretrained()
    auto_original = vars(AutoModelForCausalLM).get("from_pretrained")
    handler = ai.AccelerationKwargs(config=BNB)
    routed = _original_from_pretrained()
    assert routed is not original
    records = [r for r in Accelerator._fms_acceleration_patches.records if r.attribute == "from_pretrained"]
    assert [r.target for r in records] == [
        "transformers PreTrainedModel.from_pretrained",
        "transformers AutoConfig.from_pretrained",
        "transformers AutoModelForCausalLM.from_pretrained",
    ]
    assert records[0].original is original

    model = AutoModelForCausalLM.from_pretrained(model_dir)  # the auto class, then the concrete class
    assert _four_bit(model) == PROJECTIONS * LAYERS
    loader = framework_of(model)
    assert loader is not None and loader.active_plugin_names == ("bitsandbytes",)
    accelerator = Accelerator(cpu=True, kwargs_handlers=[handler])
    assert ai.get_framework(accelerator) is loader  # the plugin instance that loaded is the one that prepares

    # a load the plugin cannot honour is refused before anything is read, naming the reason and the fix
    from transformers import BitsAndBytesConfig

    with pytest.raises(AccelerationConfigError, match="passes its own quantization_config") as info:
        LlamaForCausalLM.from_pretrained(model_dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    assert "drop quantization_config" in str(info.value)

    # __init__, prepare, from_pretrained of PreTrainedModel, AutoConfig, AutoModelForCausalLM
    assert ai.uninstall() == 5
    assert _original_from_pretrained() is original
    assert vars(AutoModelForCausalLM).get("from_pretrained") is auto_original
    assert _four_bit(LlamaForCausalLM.from_pretrained(model_dir)) == 0  # transformers' own loader again


def test_missing_model_path_is_a_clear_error(fresh_install, tmp_path):
    from transformers import AutoModelForCausalLM

    missing = tmp_path / "no-such-model"
    framework = AccelerationFramework(BNB)
    with pytest.raises(AccelerationConfigError, match=re.escape(f"model path {str(missing)!r} does not exist")):
        framework.model_loader(str(missing))
    handler = ai.AccelerationKwargs(config=BNB)  # loads route through it while the script holds it
    with pytest.raises(AccelerationConfigError, match=re.escape(f"model path {str(missing)!r} does not exist")) as info:
        AutoModelForCausalLM.from_pretrained(str(missing))
    assert "Repo id" not in str(info.value) and "save_pretrained" in str(info.value)
    assert isinstance(info.value, OSError)  # as transformers' own error for an unreadable path
    from trl.trainer.utils import create_model_from_path  # what SFTTrainer does with a model path

    with pytest.raises(AccelerationConfigError, match=re.escape(f"model path {str(missing)!r} does not exist")):
        create_model_from_path(str(missing))
    del handler
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AccelerationConfigError, match=r"has no config\.json"):
        framework.model_loader(str(empty))


def _lora_model(model_dir: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return get_peft_model(LlamaForCausalLM.from_pretrained(model_dir), lora)


def test_prepare_refuses_a_model_loaded_outside_the_plugin(fresh_install, model_dir):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, kwargs_handlers=[ai.AccelerationKwargs(config=BNB)])
    ai.uninstall()  # the Accelerator keeps its framework; the script's load below is transformers' own
    ai.install()
    model = _lora_model(model_dir)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(AccelerationConfigError, match="the model has no 4-bit layers although") as info:
        accelerator.prepare(model, optimizer)
    assert "loaded outside the plugin" in str(info.value) and "framework.model_loader" in str(info.value)


def test_fused_lora_without_lora_says_what_the_model_lacks(fresh_install, model_dir):
    from accelerate import Accelerator
    from transformers import LlamaForCausalLM

    accelerator = Accelerator(cpu=True, kwargs_handlers=[ai.AccelerationKwargs(config=FUSED_LORA)])
    model = LlamaForCausalLM.from_pretrained(model_dir)
    with pytest.raises(AccelerationConfigError, match="fused_lora needs PEFT LoRA layers to fuse, but the model has"):
        accelerator.prepare(model)


def test_patch_table_printed_once_after_the_models_prepare(fresh_install, model_dir, capsys):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, kwargs_handlers=[ai.AccelerationKwargs(config=FUSED_LORA)])
    loader = torch.utils.data.DataLoader(list(range(8)), batch_size=4)
    accelerator.prepare(loader)  # a trainer's first prepare: no model, nothing patched, nothing printed
    assert capsys.readouterr().out == ""
    model = _lora_model(model_dir)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    ai.get_callbacks_and_ready_for_train(model, accelerator)  # prints only what was not printed yet: nothing
    out = capsys.readouterr().out
    assert out.count(TABLE) == 1 and "patches added" not in out
    assert "kernels.lora_qkv [dense] (lora)" in out and "no patches applied" not in out
    ai.get_framework(accelerator).revert()


def test_one_model_one_framework(fresh_install, model_dir):
    from accelerate import Accelerator

    model = _lora_model(model_dir)
    script = AccelerationFramework(FUSED_LORA)
    model, _ = script.augmentation(model, None, ())
    assert framework_of(model) is script
    other = AccelerationFramework(FUSED_LORA)
    with pytest.raises(AccelerationConfigError, match="another AccelerationFramework already accelerated"):
        other.augmentation(model, None, ())

    # the Accelerator's framework (equal configuration) recognises the script's and adopts it: no second patching
    accelerator = Accelerator(cpu=True, kwargs_handlers=[ai.AccelerationKwargs(config=FUSED_LORA)])
    patched = len(script.patches)
    ai.get_callbacks_and_ready_for_train(model, accelerator)  # the trainer one-liner, before prepare
    assert ai.get_framework(accelerator) is script
    accelerator.prepare(model)
    assert ai.get_framework(accelerator) is script and len(script.patches) == patched

    # a different configuration is refused, naming both
    different = {"training": {"fused_ops_and_kernels": {"fused_lora": True, "fast_rms_layernorm": True}}}
    refusing = Accelerator(cpu=True, kwargs_handlers=[ai.AccelerationKwargs(config=different)])
    with pytest.raises(AccelerationConfigError, match="both would patch the same model") as info:
        refusing.prepare(model)
    assert "fast_rms_layernorm=True" in str(info.value) and "fused_lora=True" in str(info.value)

    script.revert()  # released: another framework may accelerate the model now
    assert framework_of(model) is None
    other.augmentation(model, None, ())
    assert framework_of(model) is other
    other.revert()
