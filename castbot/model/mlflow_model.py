"""MLflow models-from-code entry: registered castbot versions are logged from this file, not pickled.

Loading a version runs this file (and castbot/, shipped as code_paths): weights, tokenizer and config are plain
files in the version's artifacts, and nothing is unpickled.
"""

from mlflow.models import set_model

from castbot.model.pyfunc import ChatModel

set_model(ChatModel())
