"""``conure data``'s flags and the run config's ``data`` keys are one definition.

Each flag of ``conure data synthetic|movielens|ttl`` names the ``data`` key it sets and takes that
key's type, default and documentation from the schema (``DataConfig``, the docstring under each
field). So a run's config and the command that builds its shards cannot drift apart, and
``data_command`` writes the exact command for a config: the error a run on missing shards
raises shows it, and ``conure run`` builds the same shards on first use.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

from conure_dist.config.data_schema import DataConfig
from conure_dist.config.describe import describe, leaf_fields


@dataclass(frozen=True)
class DataFlag:
    """One flag of ``conure data SOURCE`` and the ``data`` key it sets (``synthetic.seed``)."""

    flag: str
    key: str
    required: bool = False
    """Given on every command line (no default)."""
    default: Any = None
    """A default of this source's own instead of the key's (TTL sequences are longer); None: the key's."""

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


_OUT = DataFlag("--out", "root", required=True)
_SHARDS = (
    DataFlag("--split", "split"),
    DataFlag("--split-protocol", "split_protocol"),
    DataFlag("--instances-per-shard", "instances_per_shard"),
)
SOURCE_FLAGS: dict[str, tuple[DataFlag, ...]] = {
    "synthetic": (
        _OUT,
        *(
            DataFlag(f"--{name.replace('_', '-')}", f"synthetic.{name}")
            for name in ("num_users", "num_items", "seq_len", "seed", "relation", "relation_strength")
        ),
        DataFlag("--split-seed", "split_seed"),
        *_SHARDS,
    ),
    "movielens": (
        DataFlag("--src", "source_dir", required=True),
        _OUT,
        DataFlag("--seq-len", "seq_len"),
        DataFlag("--seed", "split_seed"),
        DataFlag("--skip-bad-rows", "skip_bad_rows"),
        DataFlag("--min-t1-interactions", "min_t1_interactions"),
        DataFlag("--t1-ratings", "t1_ratings"),
        *_SHARDS,
    ),
    "ttl": (
        _OUT,
        DataFlag("--seq-len", "seq_len", default=100),
        DataFlag("--seed", "split_seed"),
        DataFlag("--skip-bad-rows", "skip_bad_rows"),
        *_SHARDS,
    ),
}
"""The flags of each ``conure data`` source that are config keys (``ttl`` is not a ``data.source``:
its shards are built with ``conure data ttl`` only). The rest of a source's flags (``--layout``,
``--pretrain``, ``--task``) have no config key."""

READ_KEYS = ("source", "shuffle_buffer", "prefetch", "partition")
"""The ``data`` keys of how a run reads its shards, which no ``conure data`` flag sets."""


def _fractions(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected fractions such as 0.8,0.05,0.15, got {text!r}") from None


def _shown(value: Any) -> str:
    return ",".join(str(x) for x in value) if isinstance(value, list) else str(value)


def add_data_flags(parser: argparse.ArgumentParser, source: str) -> None:
    """The flags of ``SOURCE_FLAGS[source]`` on ``parser``: type, default and help from the schema."""
    types = {key: tp for key, _, tp, _ in leaf_fields(DataConfig)}
    keys = {k.key: k for k in describe(DataConfig)}
    for flag in SOURCE_FLAGS[source]:
        tp, doc = types[flag.key], keys[flag.key]
        default = doc.default if flag.default is None else flag.default
        text = " ".join(doc.doc.split()).replace("%", "%%") + f" [config key: data.{flag.key}]"
        if flag.required:
            parser.add_argument(flag.flag, required=True, dest=flag.dest, help=text)
        elif tp is bool:
            assert default is False, f"data.{flag.key}: a store_true flag needs the default False"
            parser.add_argument(flag.flag, action="store_true", dest=flag.dest, help=text)
        elif get_origin(tp) is Literal:
            parser.add_argument(
                flag.flag, choices=get_args(tp), default=default, dest=flag.dest, help=f"{text} (default: {default})"
            )
        else:
            kind = _fractions if get_origin(tp) is list else (str if tp == str | None else tp)
            parser.add_argument(
                flag.flag,
                type=kind,
                default=default,
                dest=flag.dest,
                metavar="TRAIN,VALID,TEST" if kind is _fractions else None,
                help=f"{text} (default: {_shown(default)})",
            )


def data_config(source: str, args: argparse.Namespace) -> DataConfig:
    """The ``data`` section that parsed ``conure data SOURCE`` flags describe (keys without a flag
    keep their defaults)."""
    data = DataConfig(source=source if source in ("synthetic", "movielens") else "none")
    for flag in SOURCE_FLAGS[source]:
        _set(data, flag.key, getattr(args, flag.dest))
    return data


def data_command(data: DataConfig) -> str | None:
    """The ``conure data ...`` command that builds the shards ``data`` describes (None for
    ``source: none``): every flag whose value is not its default, paths as written."""
    if data.source == "none":
        return None
    words = ["conure data", data.source]  # the program and its command
    defaults = {k.key: k.default for k in describe(DataConfig)}
    for flag in SOURCE_FLAGS[data.source]:
        value = _get(data, flag.key)
        if value is True:
            words.append(flag.flag)
        elif flag.required or value != defaults[flag.key]:
            words += [flag.flag, shlex.quote(_shown(value))]
    return " ".join(words)


def _get(data: DataConfig, key: str) -> Any:
    section, _, name = key.rpartition(".")
    return getattr(data.synthetic if section else data, name)


def _set(data: DataConfig, key: str, value: Any) -> None:
    section, _, name = key.rpartition(".")
    assert section in ("", "synthetic"), key
    setattr(data.synthetic if section else data, name, value)


__all__ = ["READ_KEYS", "SOURCE_FLAGS", "DataFlag", "add_data_flags", "data_command", "data_config"]
