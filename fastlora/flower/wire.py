"""The wire records of fastlora on Flower: the ArrayRecord that carries ``fastlora.codec``
payloads (see the package docstring for the contract), and the keys of the configs, metrics
and node state that go with them."""
from __future__ import annotations

from typing import List, Union

from flwr.app import Array, ArrayRecord, RecordDict

PAYLOAD_KEY = "fastlora"
PAYLOAD_DTYPE = "uint8"
PAYLOAD_STYPE = "fastlora.codec/1"
RESIDUAL_KEY = "fastlora.residual"
NUM_EXAMPLES_KEY = "num-examples"
MAX_NUM_EXAMPLES = 2 ** 53          # larger weights are refused (keeps every sum of weights finite)
CONFIG_UP_DENSITY = "fastlora-up-density"
CONFIG_VALUES = "fastlora-values"
CONFIG_ERROR_FEEDBACK = "fastlora-error-feedback"
CONFIG_DOWN = "fastlora-down"
CONFIG_DOWN_KIND = "fastlora-down-kind"       # diff download: "diff" (steps) or "resync" (the view)
CONFIG_VIEW_FROM = "fastlora-view-from"       # diff download: the view version the steps apply to
CONFIG_VIEW_TO = "fastlora-view-version"      # diff download: the view version they lead to
VIEW_KEY = "fastlora.view"                    # client: context.state ArrayRecord of the view it holds
VIEW_VERSION_KEY = "fastlora.view-version"    # client: context.state ConfigRecord {"version": int}
BUFFERS_KEY = "fastlora.buffers"              # train messages and replies: the ArrayRecord of the buffers
REPLY_ARRAYS_KEY = "arrays"
REPLY_METRICS_KEY = "metrics"


class PayloadError(ValueError):
    """A record is not a valid fastlora payload record (see the module docstring)."""


def pack_payload(payload: Union[bytes, bytearray, memoryview]) -> ArrayRecord:
    """The ArrayRecord that carries one ``fastlora.codec`` payload: one Array under
    :data:`PAYLOAD_KEY` (``dtype="uint8"``, ``shape=(len,)``, ``stype="fastlora.codec/1"``)."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"pack_payload expects bytes, got {type(payload).__name__}")
    data = bytes(payload)
    return ArrayRecord({PAYLOAD_KEY: Array(dtype=PAYLOAD_DTYPE, shape=(len(data),), stype=PAYLOAD_STYPE,
                                           data=data)})


def unpack_payload(record) -> bytes:
    """The payload bytes of a record made by :func:`pack_payload`. Strict: anything else (not an
    ArrayRecord, other or extra keys, another dtype/stype, a shape that disagrees with the
    data length) raises :class:`PayloadError`. The bytes themselves are checked by
    ``fastlora.codec.decode``."""
    if not isinstance(record, ArrayRecord):
        raise PayloadError(f"expected an ArrayRecord, got {type(record).__name__}")
    keys = list(record.keys())
    if keys != [PAYLOAD_KEY]:
        raise PayloadError(f"expected exactly one Array under key {PAYLOAD_KEY!r}, got keys {keys[:4]}")
    arr = record[PAYLOAD_KEY]
    if arr.stype != PAYLOAD_STYPE:
        raise PayloadError(f"Array stype is {arr.stype!r}, expected {PAYLOAD_STYPE!r} (is this a plain FedAvg "
                           "ArrayRecord? fastlora clients must reply with fastlora.flower.client_update)")
    if arr.dtype != PAYLOAD_DTYPE:
        raise PayloadError(f"Array dtype is {arr.dtype!r}, expected {PAYLOAD_DTYPE!r}")
    data = arr.data
    if not isinstance(data, bytes):
        raise PayloadError(f"Array data is {type(data).__name__}, expected bytes")
    if tuple(arr.shape) != (len(data),):
        raise PayloadError(f"Array shape {tuple(arr.shape)} disagrees with its {len(data)} data bytes")
    return data


def pack_payloads(payloads: List[bytes]) -> ArrayRecord:
    """The ArrayRecord of a ``diff`` download: one Array per payload, applied in order, under
    :data:`PAYLOAD_KEY`, ``PAYLOAD_KEY + ".1"``, ``".2"``, ... (none when the client is up to
    date); a single payload is exactly :func:`pack_payload`'s record."""
    keys = [PAYLOAD_KEY] + [f"{PAYLOAD_KEY}.{i}" for i in range(1, len(payloads))]
    return ArrayRecord({k: Array(dtype=PAYLOAD_DTYPE, shape=(len(p),), stype=PAYLOAD_STYPE, data=bytes(p))
                        for k, p in zip(keys, payloads)})


def unpack_payloads(record) -> List[bytes]:
    """The payloads of a record made by :func:`pack_payloads`, in order (strict, as
    :func:`unpack_payload`)."""
    if not isinstance(record, ArrayRecord):
        raise PayloadError(f"expected an ArrayRecord, got {type(record).__name__}")
    keys = list(record.keys())
    expected = [PAYLOAD_KEY] + [f"{PAYLOAD_KEY}.{i}" for i in range(1, len(keys))] if keys else []
    if keys != expected:
        raise PayloadError(f"expected Arrays under keys {expected[:4]}, got keys {keys[:4]}")
    out = []
    for k in keys:
        out.append(unpack_payload(ArrayRecord({PAYLOAD_KEY: record[k]})))
    return out


def _single_array_record(content: RecordDict, who: str) -> ArrayRecord:
    """The message's one ArrayRecord of payloads (or of plain tensors), besides the buffers'
    record under :data:`BUFFERS_KEY`."""
    records = [r for k, r in content.array_records.items() if k != BUFFERS_KEY]
    if len(records) != 1:
        raise PayloadError(f"{who}: expected exactly one ArrayRecord (besides {BUFFERS_KEY!r}), got {len(records)}")
    return records[0]
