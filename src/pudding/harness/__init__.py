"""The lm-evaluation-harness plugin: pudding as lm-eval's model "pudding", routing once per document.

Importing this package registers the model; lm-eval 0.4 has no entry point for model plug-ins, so use
`python -m pudding.harness` (lm-eval's own command line, same arguments, with this package imported and the local
task configs included) or `import pudding.harness` before `lm_eval.simple_evaluate(model="pudding", ...)`.
"""

from .data import TASKS_DIR, local_dataset
from .model import PuddingLM

__all__ = ["TASKS_DIR", "PuddingLM", "local_dataset"]
