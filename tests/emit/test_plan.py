"""archgen/emit/plan.py: decisions the plan makes for the templates."""

from archgen.emit.plan import heaviest_first
from archgen.ir.graph import Op


def test_a_parallel_layer_records_its_heaviest_branch_first_and_ties_keep_layout_order():
    def branch(name, *shapes):
        return Op(name, "attention", None, params={f"w{i}": shape for i, shape in enumerate(shapes)})

    light, heavy = branch("attn", (64, 64)), branch("ssm", (64, 128), (8,))
    assert heaviest_first([light, heavy]) == [1, 0]
    assert heaviest_first([heavy, light]) == [0, 1]
    assert heaviest_first([light, branch("twin", (64, 64)), heavy]) == [2, 0, 1]
