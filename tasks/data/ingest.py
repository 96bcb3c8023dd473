"""Read a transcript into canonical columns: episode, scene, speaker, line (file order kept).

Encoding policy: CSV and JSONL must be UTF-8 (a BOM is fine). Any other encoding is refused with a
message naming the first bad byte, unless the profile names it in `data.encoding` (e.g. cp1252);
then the file is decoded with it and a warning is logged. Guessing silently would corrupt names.
"""

import csv
import hashlib
import io
import json
from pathlib import Path

import pandas as pd
from prefect import task

from castbot.common.errors import DataError
from castbot.common.logs import run_logger
from castbot.common.text import shorten
from castbot.config.data import DataConfig

CANONICAL = ["episode", "scene", "speaker", "line"]
CHATTERBOT_PREFIX = "chatterbot:"
MAX_HEADER_CHARS = 65536  # a header longer than this is a file without line breaks, not a transcript
DELIMITERS = [",", ";", "\t", "|"]


def file_sha256(path: str) -> str:
    """sha256 of the transcript file (or of the chatterbot language folder's files)."""
    digest = hashlib.sha256()
    for file in _source_files(path):
        digest.update(file.read_bytes())
    return digest.hexdigest()


def source_uri(path: str) -> str:
    """file:// URI of the transcript (for chatterbot:LANGUAGE, of the corpus folder)."""
    if path.startswith(CHATTERBOT_PREFIX):
        return _chatterbot_folder(path).as_uri()
    return Path(path).resolve().as_uri()


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


def _logger():
    return run_logger("castbot.ingest")


def _short(values, limit: int = 8, width: int = 40) -> str:
    """A list for an error message: at most `limit` items, each cut to `width` characters."""
    items = [shorten(str(v), width) for v in list(values)[:limit]]
    more = f" (+{len(values) - limit} more)" if len(values) > limit else ""
    return f"{items}{more}"


def decode_text(file: Path, raw: bytes, encoding: str) -> str:
    """The file's text; refuses binary data and, unless configured, anything that is not UTF-8."""
    head = raw[:8192]
    if b"\x00" in head or sum(b < 9 or 13 < b < 32 for b in head) > len(head) * 0.05:
        raise DataError(f"{file}: looks like binary data, not a text transcript; export it as UTF-8 CSV, JSONL "
                        "or Parquet")
    if encoding.lower().replace("_", "-") in {"utf-8", "utf8", "utf-8-sig"}:
        try:
            return raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            raise DataError(
                f"{file}: not UTF-8 (byte {raw[exc.start]:#x} on line {line}), probably cp1252 or latin-1; convert "
                f"it (`iconv -f cp1252 -t utf-8 {file.name} > fixed.csv`) or set data.encoding: cp1252"
            ) from None
    try:
        text = raw.decode(encoding)
    except (UnicodeDecodeError, LookupError) as exc:
        raise DataError(f"{file}: cannot be decoded as data.encoding '{encoding}' ({exc}); fix data.encoding") from None
    _logger().warning("%s: decoded as %s (data.encoding), not UTF-8; check names with accents", file, encoding)
    return text


def check_header(file: Path, text: str, delimiter: str) -> None:
    """Refuse a header that is one endless line, uses another delimiter, or repeats a column name."""
    header = text.split("\n", 1)[0]
    if len(header) > MAX_HEADER_CHARS:
        raise DataError(f"{file}: the first line is {len(header):,} characters long with no line break; a transcript "
                        "needs a header row and one row per line of dialogue")
    names = next(csv.reader([header], delimiter=delimiter), [])
    if len(names) <= 1:
        counts = {d: header.count(d) for d in DELIMITERS if d != delimiter}
        best = max(counts, key=counts.get)
        if counts[best]:
            raise DataError(f"{file}: the header has one column with delimiter {delimiter!r} but looks "
                            f"{best!r}-delimited ({_short(header.split(best))}); set data.delimiter: {best!r}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"{file}: column name(s) {repeated} appear more than once in the header; rename them so "
                        "each mapped column is unambiguous")


def _read_table(file: Path, data: DataConfig, raw: bytes) -> pd.DataFrame:
    suffix = file.suffix.lower()
    if suffix not in {".parquet", ".jsonl", ".csv", ".tsv", ".txt"}:
        raise DataError(f"{file}: unsupported file type '{suffix}' (use .csv, .jsonl or .parquet)")
    if not raw.strip():
        raise DataError(f"{file}: the file is empty; export the transcript again")
    if suffix == ".parquet":
        try:
            return pd.read_parquet(io.BytesIO(raw))
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise DataError(f"{file}: not a readable Parquet file ({str(exc)[:200]}); export it again") from None
    text = decode_text(file, raw, data.encoding)
    if suffix == ".jsonl":
        return _read_jsonl(file, text)
    delimiter = "\t" if suffix == ".tsv" else data.delimiter
    check_header(file, text, delimiter)
    return pd.read_csv(io.StringIO(text), sep=delimiter, dtype=str, keep_default_na=False, na_values=[""])


def _read_jsonl(file: Path, text: str) -> pd.DataFrame:
    records = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(f"{file}: line {number} is not valid JSON ({exc.msg} at column {exc.colno}); fix or "
                            "delete that line") from None
        if not isinstance(record, dict):
            raise DataError(f"{file}: line {number} is a JSON {type(record).__name__}, not an object; each line "
                            "must be one object such as {\"episode\": ..., \"speaker\": ..., \"line\": ...}")
        records.append(record)
    return pd.DataFrame(records)


def canonical_frame(raw: pd.DataFrame, file: Path, data: DataConfig) -> pd.DataFrame:
    """Map configured columns to episode, scene, speaker, line; refuse missing or non-text columns."""
    mapping = {key: col for key, col in data.columns.model_dump().items() if col is not None}
    columns = list(map(str, raw.columns))
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise DataError(f"{file}: column name(s) {repeated} appear more than once; rename them")
    missing = [f"{key} -> '{col}'" for key, col in mapping.items() if col not in raw.columns]
    if missing:
        raise DataError(f"{file}: mapped column(s) missing: {', '.join(missing)}; the file has {_short(columns)}. "
                        "Fix data.columns in the profile (or data.delimiter if the header is one column)")
    for key in ("speaker", "line"):
        values = raw[mapping[key]]
        if pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
            raise DataError(f"{file}: column '{mapping[key]}' ({key}) holds {values.dtype} values, not text, e.g. "
                            f"{_short(values.head(3).tolist())}; map data.columns.{key} to the text column")
    frame = pd.DataFrame({key: raw[col] for key, col in mapping.items()})
    frame["episode"] = frame["episode"].astype(str).str.strip()
    if "season" in frame:
        frame["episode"] = "S" + frame.pop("season").astype(str).str.strip() + "E" + frame["episode"]
    if data.interleaved:  # a new block starts wherever the episode value changes
        block = (frame["episode"] != frame["episode"].shift()).cumsum()
        frame["episode"] = frame["episode"] + " #" + block.astype(str)
    frame["scene"] = frame["scene"].astype(str).str.strip() if "scene" in frame else ""
    return frame.reindex(columns=CANONICAL).reset_index(drop=True)


@task(name="load_transcript")
def load_transcript(data: DataConfig) -> pd.DataFrame:
    """Read the configured file and map its columns to episode, scene, speaker, line; the sha256 of the bytes
    read is frame.attrs["sha256"] (the file is read once)."""
    if data.path.startswith(CHATTERBOT_PREFIX):
        frame = read_chatterbot(data.path).assign(scene="").reindex(columns=CANONICAL)
        frame.attrs["sha256"] = file_sha256(data.path)
        return frame
    file = Path(data.path)
    if not file.is_file():
        raise DataError(f"{file}: transcript not found; check data.path (relative paths start at the profile's folder)")
    content = file.read_bytes()
    try:
        raw = _read_table(file, data, content)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, csv.Error) as exc:
        raise DataError(f"{file}: cannot be parsed as CSV ({str(exc)[:200]}); check data.delimiter and "
                        "quoting") from None
    if raw.empty:
        raise DataError(f"{file}: no data rows (header only?); the columns are {_short(list(raw.columns))}")
    frame = canonical_frame(raw, file, data)
    frame.attrs["sha256"] = hashlib.sha256(content).hexdigest()
    return frame
