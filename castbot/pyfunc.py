"""The MLflow pyfunc wrapper: a registered castbot model answers messages with the dialogue format."""

import mlflow.pyfunc

from castbot.dialogue import DECODING_DEFAULTS, decode_reply, prompt_ids

HF_ARTIFACT = "hf_model"  # the save_pretrained folder inside the logged model's artifacts


class ChatModel(mlflow.pyfunc.PythonModel):
    """predict(["hello", ...]) -> ["reply", ...]; each message is a single-turn chat."""

    def load_context(self, context):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = context.artifacts[HF_ARTIFACT]
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path).eval()

    def predict(self, context, model_input, params=None):
        import torch

        messages = list(model_input.iloc[:, 0]) if hasattr(model_input, "iloc") else list(model_input)
        budget = self.model.config.n_positions - DECODING_DEFAULTS["max_new_tokens"]
        replies = []
        for message in messages:
            ids = torch.tensor([prompt_ids(self.tokenizer, [str(message)], budget)])
            with torch.inference_mode():
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, **DECODING_DEFAULTS)
            replies.append(decode_reply(self.tokenizer, out[0, ids.shape[1]:].tolist()))
        return replies
