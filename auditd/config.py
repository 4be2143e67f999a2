"""Typed configuration: TOML decoded into msgspec Structs, every key with a default.

Sizes ("512KB", "5GB") and durations ("250ms", "30d") are parsed once here, so the
rest of the daemon only sees integers (bytes, milliseconds or seconds).
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import msgspec
from msgspec import Struct

from auditd.errors import ConfigError

_SIZE_UNITS = {"": 1, "B": 1, "KB": 1024, "KIB": 1024, "MB": 1024**2, "MIB": 1024**2,
               "GB": 1024**3, "GIB": 1024**3, "TB": 1024**4, "TIB": 1024**4}
_DURATION_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000,
                "w": 604_800_000}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*(?:burst\s+(\d+)\s*)?$")
_RATE_PER_S = {"s": 1.0, "m": 1 / 60, "h": 1 / 3600}

Size = int | str
Duration = int | str



class IngestConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    socket: str = "/run/auditd/ingest.sock"
    socket_mode: str = "0660"
    max_frame_bytes: Size = 1_048_576
    max_batch_events: int = 10_000
    max_event_bytes: Size = 262_144
    max_connections: int = 1024
    durability: Literal["write", "fsync"] = "write"
    # Events per second per uid with a burst, "5000/s burst 20000"; "" is off.
    rate_limit: str = ""


class BufferConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    capacity: int = 65_536
    overflow: Literal["block", "reject"] = "block"
    # Bytes of pending events held in memory; a second bound beside `capacity` so
    # a flood of large events cannot exhaust memory.
    max_bytes: Size = "64MB"


class WriterConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    batch_max: int = 4096
    batch_delay_ms: int = 5
    retry_max_delay: Duration = "5s"


class StorageConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    path: str = "/var/lib/auditd"
    journal_segment_bytes: Size = "64MB"
    # Space kept free on the storage volume: below it, ingest stops accepting so the
    # daemon can still write its checkpoint and dead letters.
    reserve_bytes: Size = "64MB"
    dlq_max_bytes: Size = "64MB"
    # Events per sealed partition: the hot table holds at most about this many (plus
    # the seal in progress) uncompressed and unindexed, the rest is sealed compact.
    partition_events: int = 131_072
    # Memory for the sealed partitions' term filters (queries skip the partitions that
    # cannot hold a value): ~385 KB per partition of 131,072 events; past it the
    # oldest partitions go without (still searched, each probe ~0.1 ms).
    term_filter_bytes: Size = "32MB"


class RetentionConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    max_age: Duration = "30d"  # "0s": no limit by age
    max_bytes: Size = "5GB"  # "0": no limit by size
    archive_dir: str = ""  # what retention deletes is exported here first (zstd)
    interval: Duration = "60s"  # how often retention runs


class ProofsConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    key_file: str = ""  # default <storage.path>/checkpoint.key, or a LoadCredential=
    checkpoint_every: Duration = "1s"  # while events arrive
    idle_every: Duration = "60s"  # at least this often when idle
    publish_file: str = ""  # each checkpoint appended here
    publish_command: str = ""  # each checkpoint handed to this command's stdin


class ForwardConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    """NATS JetStream (step 8): off while `servers` is empty."""

    servers: list[str] = msgspec.field(default_factory=list)
    stream: str = "AUDIT"
    subject: str = "audit.{host}.{type}"  # tokens {host} {type} {stream}, sanitised
    credentials: str = ""  # a .creds file (JWT and nkey seed)
    nkey: str = ""  # an nkey seed file
    user: str = ""
    password: str = ""
    token: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    max_in_flight: int = 1024  # messages published and not yet acknowledged
    batch: int = 512  # events read from the store per step
    ack_timeout: Duration = "5s"  # one deadline per batch of acknowledgements
    backoff_min: Duration = "100ms"
    backoff_max: Duration = "30s"
    lag_max_events: int = 100_000  # health is degraded past either lag bound
    lag_max_age: Duration = "60s"
    create_stream: bool = False
    replicas: int = 1  # num_replicas of a stream it creates (3 on a cluster)
    duplicate_window: Duration = "10m"  # of a stream it creates (at least 5m)


class StatusConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    socket: str = "/run/auditd/status.sock"
    socket_mode: str = "0660"
    admin_uids: list[int] = msgspec.field(default_factory=lambda: [0])
    reader_gids: list[int] = msgspec.field(default_factory=list)
    metrics_listen: str = ""


class LogConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    format: Literal["json", "console", "auto"] = "auto"


class Config(Struct, forbid_unknown_fields=True, kw_only=True):
    ingest: IngestConfig = msgspec.field(default_factory=IngestConfig)
    buffer: BufferConfig = msgspec.field(default_factory=BufferConfig)
    writer: WriterConfig = msgspec.field(default_factory=WriterConfig)
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)
    retention: RetentionConfig = msgspec.field(default_factory=RetentionConfig)
    status: StatusConfig = msgspec.field(default_factory=StatusConfig)
    proofs: ProofsConfig = msgspec.field(default_factory=ProofsConfig)
    forward: ForwardConfig = msgspec.field(default_factory=ForwardConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    source: str = ""  # the file it came from, "" for built-in defaults

    # Resolved integer views of the human-unit fields.
    def size(self, section: str, key: str) -> int:
        return parse_size(f"{section}.{key}", getattr(getattr(self, section), key))

    def duration_ms(self, section: str, key: str) -> int:
        return parse_duration_ms(f"{section}.{key}", getattr(getattr(self, section), key))

    def mode(self, section: str) -> int:
        value = getattr(self, section).socket_mode
        try:
            return int(value, 8)
        except ValueError:
            raise ConfigError(
                f"{section}.socket_mode = {value!r}: expected an octal mode like \"0660\""
            ) from None


def parse_size(key: str, value: int | str) -> int:
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{key} = {value}: expected a size >= 0")
        return value
    match = _SIZE_RE.match(value)
    unit = match.group(2).upper() if match else ""
    size = float(match.group(1)) * _SIZE_UNITS[unit] if match and unit in _SIZE_UNITS else -1
    if not 0 <= size < 2**63:  # a wrong unit, or 400 digits: float("9" * 400) is inf
        raise ConfigError(f"{key} = {value!r}: expected a size like 512KB, 64MB or 5GB")
    return int(size)


def parse_duration_ms(key: str, value: int | str) -> int:
    """Durations: a string with a unit ("250ms", "30d"), or a bare integer of seconds."""
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{key} = {value}: expected a duration >= 0")
        return value * 1000
    match = _DURATION_RE.match(value)
    ms = float(match.group(1)) * _DURATION_MS[match.group(2)] if match else -1
    if not 0 <= ms < 2**63:
        raise ConfigError(f"{key} = {value!r}: expected a duration like 250ms, 30s or 30d")
    return int(ms)


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket's settings: `per_s` tokens a second, at most `burst` saved up."""

    per_s: float
    burst: int

    def __str__(self) -> str:
        return f"{self.per_s:g}/s burst {self.burst}"


def parse_rate_limit(key: str, value: str) -> RateLimit | None:
    """ "5000/s burst 20000" (also /m, /h) -> RateLimit; "" -> None (off). Without a
    burst, one second's worth (at least 1 event) may be saved up."""
    if not value.strip():
        return None
    match = _RATE_RE.match(value)
    rate = float(match.group(1)) * _RATE_PER_S[match.group(2)] if match else 0.0
    burst = int(match.group(3)) if match and match.group(3) else max(1, int(rate))
    if not match or rate <= 0 or burst < 1:
        raise ConfigError(f"{key} = {value!r}: expected a rate per uid like "
                          '"5000/s burst 20000" (a positive rate, a burst >= 1), '
                          'or "" for no limit')
    return RateLimit(rate, burst)


_SIZE_KEYS = [("ingest", "max_frame_bytes"), ("ingest", "max_event_bytes"),
              ("buffer", "max_bytes"), ("storage", "journal_segment_bytes"),
              ("storage", "reserve_bytes"), ("storage", "dlq_max_bytes"),
              ("retention", "max_bytes"), ("storage", "term_filter_bytes")]
_DURATION_KEYS = [("writer", "retry_max_delay"), ("retention", "max_age"),
                  ("retention", "interval"),
                  ("proofs", "checkpoint_every"), ("proofs", "idle_every"),
                  ("forward", "ack_timeout"), ("forward", "backoff_min"),
                  ("forward", "backoff_max"), ("forward", "lag_max_age"),
                  ("forward", "duplicate_window")]
_POSITIVE_KEYS = [("ingest", "max_batch_events"), ("ingest", "max_connections"),
                  ("buffer", "capacity"), ("writer", "batch_max"),
                  ("forward", "max_in_flight"), ("forward", "batch"),
                  ("forward", "lag_max_events"), ("forward", "replicas")]


def parse_listen(value: str) -> tuple[str, int]:
    """status.metrics_listen "host:port" ("[::1]:9477" for IPv6) -> (host, port)."""
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isascii() or not port.isdigit() \
            or not 0 < int(port) < 65536:  # isdigit() alone takes "²", which int() refuses
        raise ConfigError(f"status.metrics_listen = {value!r}: expected host:port like "
                          "127.0.0.1:9477")
    return host, int(port)


def _check(config: Config) -> None:
    for section, key in _SIZE_KEYS:
        config.size(section, key)
    for section, key in _DURATION_KEYS:
        config.duration_ms(section, key)
    for section, key in _POSITIVE_KEYS:
        value = getattr(getattr(config, section), key)
        if value < 1:
            raise ConfigError(f"{section}.{key} = {value}: expected an integer >= 1")
    if not 100 <= config.storage.partition_events <= 16_000_000:
        raise ConfigError(f"storage.partition_events = {config.storage.partition_events}: "
                          "expected an integer from 100 to 16000000")
    if config.duration_ms("retention", "interval") < 100:
        raise ConfigError(f"retention.interval = {config.retention.interval!r}: expected "
                          "at least 100ms")
    if config.writer.batch_delay_ms < 0:
        raise ConfigError(
            f"writer.batch_delay_ms = {config.writer.batch_delay_ms}: expected an integer >= 0"
        )
    frame = config.size("ingest", "max_frame_bytes")
    if frame < 16:
        raise ConfigError(
            f"ingest.max_frame_bytes = {config.ingest.max_frame_bytes!r}: "
            "expected at least 16 bytes")
    config.mode("ingest")
    config.mode("status")
    parse_rate_limit("ingest.rate_limit", config.ingest.rate_limit)
    if config.status.metrics_listen:
        parse_listen(config.status.metrics_listen)
    _check_forward(config)


_SUBJECT_TOKENS = re.compile(r"\{(host|type|stream)\}")
_STREAM_NAME = re.compile(r"^[A-Za-z0-9_-]{1,255}$")


def _check_forward(config: Config) -> None:
    forward = config.forward
    for index, server in enumerate(forward.servers):
        if not re.match(r"^(nats|tls|ws|wss)://[^\s/]+$", server):
            raise ConfigError(f"forward.servers[{index}] = {server!r}: expected a URL like "
                              "nats://10.0.0.5:4222")
    if not _STREAM_NAME.match(forward.stream):
        raise ConfigError(f"forward.stream = {forward.stream!r}: expected a stream name of "
                          "letters, digits, _ and -")
    bare = _SUBJECT_TOKENS.sub("x", forward.subject)
    if "{" in bare or "}" in bare or not re.match(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$", bare):
        raise ConfigError(f"forward.subject = {forward.subject!r}: expected dot-separated "
                          "tokens of letters, digits, _ and -, with {host}, {type}, {stream}")
    if config.duration_ms("forward", "duplicate_window") < 300_000:
        raise ConfigError(f"forward.duplicate_window = {forward.duplicate_window!r}: expected "
                          "at least 5m (JetStream's dedupe must outlast a resend)")
    if bool(forward.tls_cert) != bool(forward.tls_key):
        raise ConfigError("forward.tls_cert and forward.tls_key: expected both or neither")
    if bool(forward.user) != bool(forward.password):
        raise ConfigError("forward.user and forward.password: expected both or neither")


def _lookup(raw: dict[str, Any], path: str) -> Any:
    """The raw value at a msgspec path like `status.admin_uids[1]`."""
    node: Any = raw
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        if part.startswith("["):
            index = int(part[1:-1])
            if not isinstance(node, list) or index >= len(node):
                return None
            node = node[index]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return node


def _choices(path: str) -> tuple[str, ...]:
    """The allowed values of a Literal-typed key, for the error message."""
    section, _, key = path.partition(".")
    for field in msgspec.structs.fields(Config):
        if field.name == section:
            for inner in msgspec.structs.fields(field.type):
                if inner.name == key and get_origin(inner.type) is Literal:
                    return tuple(str(v) for v in get_args(inner.type))
    return ()


def config_from_dict(raw: dict[str, Any], source: str = "") -> Config:
    """Validate a parsed TOML document; errors name the key, the value and what was expected."""
    try:
        config = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = re.search(r" - at `\$\.([^`]+)`$", text)
        problem = text[: match.start()] if match else text
        problem = problem.replace("`", "")
        unknown = re.match(r"Object contains unknown field (\S+)", problem)
        if unknown:
            where = f"{match.group(1)}." if match else ""
            raise ConfigError(f"{where}{unknown.group(1)}: unknown key") from None
        if match:
            key = match.group(1)
            value = _lookup(raw, key)
            expected = problem[0].lower() + problem[1:]
            choices = _choices(key)
            if choices:
                expected = "expected one of " + ", ".join(f'"{c}"' for c in choices)
            raise ConfigError(f"{key} = {value!r}: {expected}") from None
        raise ConfigError(problem) from None
    config.source = source
    _check(config)
    return config


def load_config(path: str | None = None) -> Config:
    """Load the named file, else $AUDITD_CONFIG, else /etc/auditd/auditd.toml, else defaults.

    Every way a file can fail to be read (missing, a directory, a FIFO, not UTF-8,
    unreadable) is a ConfigError with one line naming the file: a reload refuses it
    and the old config runs on.
    """
    named = path or os.environ.get("AUDITD_CONFIG")
    candidate = Path(named) if named else Path("/etc/auditd/auditd.toml")
    text = _read_config_text(candidate, named is not None)
    if text is None:
        return Config()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{candidate}: not valid TOML: {exc}") from None
    except RecursionError:  # tomllib is pure Python and recurses once per nested array
        raise ConfigError(f"{candidate}: not valid TOML: nested too deep to read") from None
    return config_from_dict(raw, str(candidate))


_MAX_CONFIG_BYTES = 1024 * 1024  # a config file is a few KB; more is not one


def _read_config_text(path: Path, named: bool) -> str | None:
    """The file's text; None when the default file is absent (built-in defaults apply)."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (fstat refuses it below).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        if named:
            raise ConfigError(f"{path}: no such config file") from None
        return None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot open: {exc.strerror or exc}") from None
    except ValueError as exc:  # an embedded NUL byte in the name
        raise ConfigError(f"{path!r}: not a usable file name: {exc}") from None
    try:
        kind = os.fstat(fd).st_mode
        if stat.S_ISDIR(kind):
            raise ConfigError(f"{path}: is a directory, not a config file")
        if not stat.S_ISREG(kind):
            raise ConfigError(f"{path}: not a regular file (a FIFO, socket or device)")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(_MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > _MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {_MAX_CONFIG_BYTES} bytes; not a config file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8: byte 0x{data[exc.start]:02x} at offset "
                          f"{exc.start}") from None
