"""Read a transcript into canonical columns: episode, scene, speaker, line (file order kept)."""

import hashlib
import json
from pathlib import Path

import pandas as pd
from prefect import task

from castbot.config import DataConfig
from tasks.errors import DataError

CANONICAL = ["episode", "scene", "speaker", "line"]
CHATTERBOT_PREFIX = "chatterbot:"


def file_sha256(path: str) -> str:
    """sha256 of the transcript file (or of the chatterbot language folder's files)."""
    digest = hashlib.sha256()
    for file in _source_files(path):
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _source_files(path: str) -> list[Path]:
    if path.startswith(CHATTERBOT_PREFIX):
        return sorted(_chatterbot_folder(path).glob("*.yml"))
    return [Path(path)]


def _chatterbot_folder(path: str) -> Path:
    import chatterbot_corpus

    language = path.removeprefix(CHATTERBOT_PREFIX) or "english"
    folder = Path(chatterbot_corpus.__file__).parent / "data" / language
    if not folder.is_dir():
        raise DataError(f"{path}: chatterbot-corpus has no language '{language}'")
    return folder


def read_chatterbot(path: str) -> pd.DataFrame:
    """chatterbot-corpus conversations: each is an episode; turns alternate User, Bot."""
    import yaml

    rows = []
    for file in sorted(_chatterbot_folder(path).glob("*.yml")):
        for i, conversation in enumerate(yaml.safe_load(file.read_text(encoding="utf-8"))["conversations"]):
            for turn, text in enumerate(conversation):
                speaker = "Bot" if turn % 2 else "User"
                rows.append({"episode": f"{file.stem}/{i}", "speaker": speaker, "line": str(text)})
    return pd.DataFrame(rows)


def _read_table(file: Path, delimiter: str) -> pd.DataFrame:
    suffix = file.suffix.lower()
    if suffix == ".parquet":
        return pd.read_parquet(file)
    text = file.read_bytes()
    if not text.strip():
        raise DataError(f"{file}: the file is empty")
    try:
        text.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{file}: not UTF-8 (byte {text[exc.start]:#x} at offset {exc.start}); "
            "convert it, e.g. `iconv -f cp1252 -t utf-8`"
        ) from None
    if suffix == ".jsonl":
        return _read_jsonl(file)
    if suffix in {".csv", ".tsv", ".txt"}:
        return pd.read_csv(file, sep="\t" if suffix == ".tsv" else delimiter, encoding="utf-8-sig", dtype=str,
                           keep_default_na=False, na_values=[""])
    raise DataError(f"{file}: unsupported file type '{suffix}' (use .csv, .jsonl or .parquet)")


def _read_jsonl(file: Path) -> pd.DataFrame:
    records = []
    for number, raw in enumerate(file.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            records.append(json.loads(raw))
        except json.JSONDecodeError as exc:
            raise DataError(f"{file}: line {number} is not valid JSON ({exc.msg})") from None
    return pd.DataFrame(records)


@task(name="ingest")
def load_transcript(data: DataConfig) -> pd.DataFrame:
    """Read the configured file and map its columns to episode, scene, speaker, line."""
    if data.path.startswith(CHATTERBOT_PREFIX):
        return read_chatterbot(data.path).assign(scene="").reindex(columns=CANONICAL)
    file = Path(data.path)
    if not file.is_file():
        raise DataError(f"{file}: transcript not found")
    try:
        raw = _read_table(file, data.delimiter)
    except (pd.errors.ParserError, ValueError, OSError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{file}: cannot be parsed ({exc})") from None
    if raw.empty:
        raise DataError(f"{file}: no rows (header only?)")
    mapping = data.columns.model_dump()
    missing = [f"{key} -> '{col}'" for key, col in mapping.items() if col is not None and col not in raw.columns]
    if missing:
        raise DataError(
            f"{file}: mapped column(s) missing: {', '.join(missing)}; the file has {list(map(str, raw.columns))}"
        )
    frame = pd.DataFrame({key: raw[col] for key, col in mapping.items() if col is not None})
    for key in ("speaker", "line"):
        if pd.api.types.is_numeric_dtype(frame[key]) or pd.api.types.is_bool_dtype(frame[key]):
            raise DataError(f"{file}: column '{mapping[key]}' ({key}) holds {frame[key].dtype} values, not text")
        if isinstance(frame[key], pd.DataFrame):
            raise DataError(f"{file}: column name '{mapping[key]}' appears more than once")
    frame["episode"] = frame["episode"].astype(str)
    if "scene" not in frame:
        frame["scene"] = ""
    return frame.reindex(columns=CANONICAL).reset_index(drop=True)
