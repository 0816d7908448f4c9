"""archgen/importers/common.py: the walk over a model's expected parameters that every hybrid model type shares."""

from archgen.importers.common import block_weight_plans
from archgen.importers.weights import TensorPlan


def test_block_parameters_go_to_the_model_types_plan_and_the_rest_are_renamed_or_kept():
    expected = {"embed.weight": (10, 4), "layers.0.mixer_norm.weight": (4,), "layers.12.ffn.w_in": (2, 4, 6),
                "layers.3.mixer.A_log": (2,), "lm_head.weight": (10, 4)}
    seen = []

    def block_plan(target, shape, layer, module, rest):
        seen.append((target, shape, layer, module, rest))
        return TensorPlan.copy(target, f"hf.{layer}.{module}.{rest}")

    plans = block_weight_plans(expected, {"embed.weight": "model.embed_tokens.weight"}, block_plan)
    assert [plan.target for plan in plans] == list(expected)
    assert seen == [("layers.0.mixer_norm.weight", (4,), 0, "mixer_norm", "weight"),
                    ("layers.12.ffn.w_in", (2, 4, 6), 12, "ffn", "w_in"),
                    ("layers.3.mixer.A_log", (2,), 3, "mixer", "A_log")]
    sources = {plan.target: plan.rows[0][0].source for plan in plans}
    assert sources["embed.weight"] == "model.embed_tokens.weight" and sources["lm_head.weight"] == "lm_head.weight"
    assert sources["layers.12.ffn.w_in"] == "hf.12.ffn.w_in"
