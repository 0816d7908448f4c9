# Names vulture (the dead-code check in .ci/run) cannot see being used. Reviewed by hand: add a name here only with
# the reason it is alive. `_` is vulture's placeholder object for attribute names.
# ruff: noqa
_ = object()

# Read by the Jinja templates (templates/package/model.py.j2 includes each extra's model template).
_.model_template
# EmitPlan fields only the templates read.
_.n_branches
_.import_lines
_.layout_text
_.preludes
_.norm_module
_.step_hooks
_.init_hooks
_.aligned_vocab
_.greedy_pick_kernel  # model.py.j2: pick_greedy and the decoder's pick
# Spec fields (pydantic) that only the templates read, through `c.cfg.<field>`; and pydantic's own settings.
model_config
entropy_weight
fraction_weight
normalize_top_k
load_balancing_weight
z_loss_weight
learning_rate
loss_weight
mask_ratio
ema_momentum
l2_weight
vicreg_invariance_weight
vicreg_variance_weight
vicreg_covariance_weight
schema_version
cls  # the first argument of pydantic's @classmethod validators
# onnxruntime.SessionOptions, set for its side effect.
_.log_severity_level
# Switches of generated models, set by the benches and tests (the generated code reads them).
_.gradient_checkpointing
_.use_kernel
_.mask_generator
_.expert_group
_.predictor
# bench/selective_scan_kernel.py runs its sections by name (SECTIONS -> getattr(bench, name)).
_.backward_configs
_.chunk_sizes
_.correctness
_.autotune
_.anchor
_.reference_path
_.mamba_ssm
# bench/gdn_check.py likewise.
_.speed
_.decode_step
# bench/ssm_kernels.py likewise.
_.ssd_numerics
_.ssd_timing
_.ssd_peer
_.conv_peer
# Called by the generated kernels/__init__.py (templates/package/kernels_init.py.j2) for ONNX export.
decomposition
# Read by the attention template's decoding branch (kernels.decode_attention_module.FEW_QUERIES).
FEW_QUERIES
# pytest reads it.
pytestmark
# Dataclass fields written out whole (asdict -> JSON).
torch_version
# Overrides of methods the base class calls (tests/templates/runtime/test_decoding.py's EagerDecoder.capture).
_.capture
# transformers reads these generation settings, which tests/importers/hf_models.py sets on a model's generation_config.
_.eos_token_id
_.pad_token_id
# Set on a `tokenizers.Tokenizer` (archgen/train/tokenizer.py, train_bpe): the library reads it when it trains and encodes.
_.pre_tokenizer
# bench/attn_moe_kernels.py runs its sections by name; USE_FLEX_ATTENTION is a switch of ops/routing.py it sets.
_.attn_num
_.moe_num
_.sparse_num
_.sparse
_.hspmn_262k
_.rmsnorm
_.USE_FLEX_ATTENTION
# bench/moe_check.py sets ops/moe.py's switch FORCE_GROUPED_MM (torch's CPU _grouped_mm in its dry run).
_.FORCE_GROUPED_MM
# EmitPlan.norm_kernel is read by templates (model.py.j2's RMSNorm, block.py.j2's fused residual add).
_.norm_kernel
# EmitPlan.gemv_kernel and lm_head_linear are read by model.py.j2 (DecodeLinear, runs_gemv and the lm_head's class).
_.gemv_kernel
_.lm_head_linear
# ComponentPlan.defers_projection (attention.py.j2, mamba.py.j2) and ParallelPlan.combines_projections (parallel.py.j2):
# a parallel layer's combine run in its branches' output projections (kernels/combine_projections.py).
_.defers_projection
_.combines_projections
# EmitPlan.norm_folds_scale is read by parallel.py.j2 (a normalized mean's scales folded into the norms' weights).
_.norm_folds_scale
# BenchResult fields that reach the JSON through dataclasses.asdict (bench/whole_model.py reads them there).
_.active_parameters
# bench/sm90_audit.py's stub Triton driver: Triton calls these (triton.runtime.driver.active).
_.launcher_cls
_.load_binary
_.is_active
_.map_python_to_cpp_type
_.get_current_target
_.get_current_device
_.set_current_device
_.get_current_stream
_.get_active_torch_device
_.get_benchmarker
# ComponentPlan.takes_input_norm (attention.py.j2, mamba.py.j2) and ParallelPlan.recorded_branches (parallel.py.j2):
# read by the templates only
_.takes_input_norm
_.recorded_branches
