"""Render an EmitPlan into the files of a generated package: {relative path: text}, nothing written yet.

Templates run under StrictUndefined, so a missing value is an error instead of an empty string, and only plan data
reaches them: validated identifiers and numbers, and strings passed through repr(). Every Python file rendered is
compiled before it is returned, so a template bug fails the build instead of producing a broken package.
"""

from __future__ import annotations

import pprint

import jinja2
import yaml

from archgen.emit.format import format_python
from archgen.emit.plan import EmitPlan, kernel_functions
from archgen.errors import CompileError, Diagnostic
from archgen.ir.graph import IR
from archgen.kinds import kind_of
from archgen.passes.cost import count
from archgen.report.diagram import layout_svg
from archgen.report.tables import human_bytes, human_count
from archgen.resolve.resolve import lock_document
from archgen.resources import KERNEL_SUPPORT_FILES, KERNELS, TEMPLATES, kernel_modules

ACTIVATIONS = {
    "swiglu": "F.silu({})", "silu": "F.silu({})", "geglu": "F.gelu({})", "gelu": "F.gelu({})",
    "relu": "F.relu({})", "relu2": "F.relu({}).square()",
}


def scaled_branch(name: str, folds_scale: bool) -> str:
    """One branch's scale × norm(output) in a parallel layer's normalized mean, with the scale folded into the norm's
    weight where the norm takes it: then the scale makes no pass over the activations, forward or backward."""
    if folds_scale:
        return f"self.{name}_norm({name}_out, scale=self.{name}_scale)"
    return f"self.{name}_scale * self.{name}_norm({name}_out)"


def environment(plan: EmitPlan) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,  # Python source, not HTML: values are escaped with repr() where they are strings
    )
    env.filters["pyrepr"] = repr
    env.filters["doc"] = docstring_text
    env.filters["branch_output"] = lambda name: f"{name}_out"
    env.filters["format_branch"] = scaled_branch
    env.globals.update(
        plan=plan, activation_call=lambda name, arg: ACTIVATIONS[name].format(arg), human_count=human_count,
        human_bytes=human_bytes,
    )
    return env


def render_package(plan: EmitPlan, ir: IR) -> dict[str, str]:
    env = environment(plan)
    lock = lock_document(ir.spec)
    block_params = _block_params(plan, ir)
    files = {
        "__init__.py": env.get_template("package/__init__.py.j2").render(),
        "config.py": env.get_template("package/config.py.j2").render(
            config_literal=pprint.pformat(ir.spec.document, width=110, sort_dicts=True)),
        "model.py": _tidy(env.get_template("package/model.py.j2").render()),
        "README.md": env.get_template("package/README.md.j2").render(block_params=block_params),
        "pyproject.toml": env.get_template("package/pyproject.toml.j2").render(),
        "diagram.svg": layout_svg(ir.spec),
        "spec.lock.yaml": yaml.safe_dump(lock, sort_keys=False, width=110),
        "ops/__init__.py": '"""Reference operators this model uses, copied from archgen\'s templates/runtime. Do not edit."""\n',
    }
    rendered = [path for path in files if path.endswith(".py")]  # not the verbatim copies below
    for name in plan.runtime_files:
        files[f"ops/{name}.py"] = (TEMPLATES / "runtime" / f"{name}.py").read_text(encoding="utf-8")
    if plan.kernel_files:
        kernels_init = env.get_template("package/kernels_init.py.j2")
        files["kernels/__init__.py"] = kernels_init.render(kernel_functions=kernel_functions(ir))
        rendered.append("kernels/__init__.py")
        for name in kernel_modules((*KERNEL_SUPPORT_FILES, *plan.kernel_files)):
            files[f"kernels/{name}.py"] = (KERNELS / f"{name}.py").read_text(encoding="utf-8")
    for path, text in files.items():
        if path.endswith(".py"):
            try:
                compile(text, f"generated/{plan.name}/{path}", "exec")
            except SyntaxError as error:
                line = text.splitlines()[error.lineno - 1] if error.lineno else ""
                message = f"archgen emitted invalid Python in {path}:{error.lineno}: {error.msg}: {line.strip()!r}"
                raise CompileError([Diagnostic("", message, "this is an archgen bug: please report it with the spec")]) from None
    for path in rendered:
        files[path] = format_python(files[path], f"generated/{plan.name}/{path}")
    return files


def docstring_text(text: str) -> str:
    """Make free text from a spec (description, paths, --set overrides) safe inside a triple-quoted docstring."""
    return str(text).replace("\\", "\\\\").replace('"""', '\\"\\"\\"')


def _block_params(plan: EmitPlan, ir: IR) -> dict[str, int]:
    table = {}
    for blk in plan.blocks:
        first = blk.layers[0]
        table[blk.class_name] = sum(count(shape) for op in ir.ops() if op.layer == first and kind_of(op.kind).role != "extra"
                                    for shape in op.params.values())
    return table


def _tidy(text: str) -> str:
    """Collapse the blank-line runs left by template conditionals to PEP 8's two between top-level definitions."""
    lines = text.splitlines()
    out: list[str] = []
    blank = 0
    for line in lines:
        if line.strip():
            if blank:
                top_level = line.startswith(("class ", "def ", "@"))
                out.extend([""] * (2 if top_level else 1))
            blank = 0
            out.append(line.rstrip())
        else:
            blank += 1
    return "\n".join(out) + "\n"
