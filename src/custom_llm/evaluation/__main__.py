"""``python -m custom_llm.evaluation ARGS``: lm-eval's own command line, with ``--model custom-llm`` available.

lm-eval finds models only in its registry, and a model defined outside its source tree is in it once
the defining module is imported; this entry point imports ours first, then hands over to lm-eval.
"""

from lm_eval.__main__ import cli_evaluate

from . import harness  # noqa: F401  (registers the custom-llm model type)

if __name__ == "__main__":
    cli_evaluate()
