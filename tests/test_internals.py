"""The libraries' internals this project relies on, named one by one, so that an upgrade fails here, loudly.

pyproject.toml caps Ray, DeepSpeed, transformers, PEFT, torch and the rest below their next minor (or major)
release; raising a cap means running this file first. Each test says where the internal is used; the
tests that use the same code end to end (test_local_ray, test_recovery, test_ds_ops, test_methods,
test_study) fail too, but later and less clearly.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


# --- Ray ------------------------------------------------------------------------------------------------------

def test_ray_private_names_of_the_local_ray():
    """study/local_ray.py: single-machine mode, the node's addresses, the token's reload and check;
    study/study.py start_ray: the GCS port read from the environment."""
    import ray._private.node
    import ray._private.worker
    from ray._private import ray_constants
    from ray._private.authentication.authentication_utils import is_token_auth_enabled
    from ray._raylet import AuthenticationTokenLoader, Config

    assert isinstance(ray_constants.ENABLE_RAY_CLUSTER, bool)
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" in inspect.getsource(ray_constants)
    assert ray_constants.GCS_PORT_ENVIRONMENT_VARIABLE == "RAY_GCS_SERVER_PORT"
    assert "GCS_PORT_ENVIRONMENT_VARIABLE" in inspect.getsource(ray._private.node.Node.__init__)
    assert hasattr(ray._private.worker, "_global_node")
    for attribute in ("node_ip_address", "gcs_address", "webui_url", "node_manager_port", "metrics_agent_port",
                      "runtime_env_agent_port", "dashboard_agent_listen_port", "metrics_export_port"):
        assert isinstance(getattr(ray._private.node.Node, attribute), property), attribute
    assert callable(is_token_auth_enabled)
    assert callable(Config.initialize) and callable(AuthenticationTokenLoader.instance().reset_cache)


def test_ray_train_backend_that_trainables_rendezvous_replaces():
    """trainables/rendezvous.py: Ray Train's torch backend, its per-worker env setup, and how the Train V2
    controller calls a backend (`backend_config.backend_cls()`, then on_start / on_shutdown)."""
    from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup  # noqa: F401
    from ray.train.backend import Backend
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend
    from ray.train.v2._internal.callbacks.backend_setup import BackendSetupCallback
    from ray.train.v2._internal.execution.worker_group.execution_group import ExecutionGroup

    assert issubclass(_TorchBackend, Backend)
    assert params(_TorchBackend.on_start) == ["self", "worker_group", "backend_config"]
    assert params(_TorchBackend.on_shutdown) == ["self", "worker_group", "backend_config"]
    assert params(_set_torch_distributed_env_vars) == []
    assert {f.name: f.default for f in dataclasses.fields(TorchConfig)} == \
        {"backend": None, "init_method": "env", "timeout_s": 1800}
    assert TorchConfig().backend_cls is _TorchBackend
    setup = inspect.getsource(BackendSetupCallback)
    assert "backend_config.backend_cls()" in setup and ".on_start(" in setup and ".on_shutdown(" in setup
    # rendezvous._FileStoreBackend passes the worker's arguments by position: the first parameter is `rank`
    assert params(ExecutionGroup.execute_single_async)[:3] == ["self", "rank", "fn"]
    assert params(ExecutionGroup.execute)[:2] == ["self", "fn"]


def test_ray_tune_internals():
    """trainables/driver.py: TuneReportCallback.after_report; study/mlflow_runs.py: MLflowLoggerCallback's
    mlflow_util and _trial_runs; study/search.py: OptunaSearch's _ot_study and _ot_trials;
    tests/test_resume.py: Tune's TUNE_GLOBAL_CHECKPOINT_S."""
    from ray.air._internal.mlflow import _MLflowLoggerUtil
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.tune.search.optuna import OptunaSearch

    assert params(TuneReportCallback.after_report) == ["self", "run_context", "metrics", "checkpoint"]
    callback = MLflowLoggerCallback(tracking_uri="sqlite:///unused.db", experiment_name="x", save_artifact=False)
    assert isinstance(callback.mlflow_util, _MLflowLoggerUtil)
    for name in ("_get_client", "start_run", "end_run"):
        assert callable(getattr(callback.mlflow_util, name)), name
    assert "self._trial_runs = {}" in inspect.getsource(MLflowLoggerCallback.setup)
    search = OptunaSearch(metric="score", mode="max")
    assert search._ot_trials == {} and hasattr(search, "_ot_study")
    assert "TUNE_GLOBAL_CHECKPOINT_S" in inspect.getsource(TuneController.__init__)


# --- DeepSpeed ------------------------------------------------------------------------------------------------

def test_deepspeed_op_table_that_ds_ops_edits():
    """trainables/ds_ops.py: the per-process table DeepSpeed's comm backend reads before it builds the shm op."""
    import deepspeed.comm.comm as comm
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    from trainables import ds_ops

    assert ShareMemCommBuilder.NAME == ds_ops.SHM_OP
    assert isinstance(deepspeed.ops.__compatible_ops__, dict) and ds_ops.SHM_OP in deepspeed.ops.__compatible_ops__
    assert hasattr(comm, "cdb")
    from deepspeed.comm.torch import TorchBackend, build_shm_op

    assert "__compatible_ops__" in inspect.getsource(build_shm_op)  # looked up before anything is built
    assert "build_shm_op()" in inspect.getsource(TorchBackend.__init__)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_deepspeed_zero_state_that_checkpoints_read(zero_stage, process_group):
    """trainables/checkpoint.py (`capture`, `restore`) and trainables/model.py (`gathered_state`): a real ZeRO
    engine, one rank on gloo, and the optimizer state and methods they use."""
    import deepspeed

    from trainables import checkpoint, ds_ops

    ds_ops.prepare()
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    config = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": zero_stage}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config,
                                      dist_init_required=False)
    engine.backward(engine(torch.randn(2, 8)).pow(2).mean())
    engine.step()
    opt = engine.optimizer
    assert opt.dynamic_loss_scale is False
    for name in ("global_steps", "global_samples", "micro_steps", "skipped_steps"):
        assert isinstance(getattr(engine, name), int), name
    assert {"load_optimizer_states", "load_from_fp32_weights"} <= set(params(opt.load_state_dict))
    state = opt.state_dict()
    assert checkpoint.LOSS_SCALER in state
    if zero_stage == 2:
        assert checkpoint.SLICES in state and callable(opt.update_lp_params)
        assert {"start", "numel"} <= set(vars(next(iter(state[checkpoint.SLICES][0].values()))))
    else:
        assert callable(opt.checkpoint_event_prologue) and callable(opt.checkpoint_event_epilogue)
        assert set(engine._zero3_consolidated_16bit_state_dict()) == {"0.weight", "0.bias", "1.weight", "1.bias"}


# --- transformers and PEFT ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=16, patch_size=8)
    return LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision, image_token_index=63))


def test_transformers_llava_layout(tiny_llava):
    """trainables/model.py (build_llava), trainables/methods/mma/model.py (_inject) and
    trainables/methods/stages.py (part_of): where LLaVA keeps its parts and how their parameters are named."""
    from trainables.methods.stages import part_of

    inner = tiny_llava.model
    assert len(inner.language_model.layers) == 2 and len(inner.vision_tower.encoder.layers) == 2
    assert hasattr(inner, "multi_modal_projector") and hasattr(tiny_llava, "lm_head")
    parts = {part_of(name) for name, _ in tiny_llava.named_parameters()}
    assert parts == {"vision_tower", "projector", "llm"}


def test_peft_names_that_stages_read(tiny_llava):
    """trainables/methods/lora.py and stages.py: LoRA on the LLM's linear layers, the projector saved whole
    (PEFT's ModulesToSaveWrapper keeps the frozen copy as `original_module`), the base under `base_layer`."""
    import copy

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training  # noqa: F401

    config = LoraConfig(r=2, lora_alpha=4, target_modules=r".*language_model\..*\.(q_proj|v_proj)",
                        modules_to_save=["multi_modal_projector"])
    peft_model = get_peft_model(copy.deepcopy(tiny_llava), config)
    names = [n for n, _ in peft_model.named_parameters()]
    assert any("language_model." in n and ".base_layer." in n for n in names)
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    projector = [n for n in names if "multi_modal_projector." in n]
    assert any("original_module" in n for n in projector) and any("modules_to_save" in n for n in projector)


# --- bitsandbytes ---------------------------------------------------------------------------------------------

def test_bitsandbytes_cpu_fast_path_switch():
    """trainables/methods/qlora.py (exact_cpu_kernels): Linear4bit's per-layer switch for its CPU bf16 path."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(8, 8, quant_type="nf4")
    assert hasattr(layer, "support_avx512bf16_for_cpu")  # has_avx512bf16(): truthy where the CPU has it
    assert "self.support_avx512bf16_for_cpu" in inspect.getsource(bnb.nn.Linear4bit.forward)
