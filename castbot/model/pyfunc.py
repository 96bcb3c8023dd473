"""The MLflow pyfunc wrapper: a registered castbot model answers messages as the service does."""

import mlflow.pyfunc

HF_ARTIFACT = "hf_model"  # the save_pretrained folder inside the logged model's artifacts


class ChatModel(mlflow.pyfunc.PythonModel):
    """predict(["hello", ...]) -> ["reply", ...]; each message is a single-turn chat with the default decoding."""

    def load_context(self, context):
        from castbot.model.bot import Bot

        self.bot = Bot.load(context.artifacts[HF_ARTIFACT])

    def predict(self, context, model_input, params=None):
        messages = list(model_input.iloc[:, 0]) if hasattr(model_input, "iloc") else list(model_input)
        return [reply.reply for reply in self.bot.generate([[("", str(message))] for message in messages])]
