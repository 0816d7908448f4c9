"""Published models in and out: Hugging Face configs and checkpoints to specs (`import_hf`), and specs that are
exactly a transformers model type back to a config and checkpoint (`export_spec`)."""

from archgen.importers.export_spec import ExportResult, export_spec
from archgen.importers.hf_import import ImportResult, import_hf

__all__ = ["ExportResult", "ImportResult", "export_spec", "import_hf"]
