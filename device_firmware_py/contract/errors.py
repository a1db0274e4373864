"""The one exception type of the wire contract, with a stable machine-readable reason.

Why a reason code and not just a message: the server records every rejected message in the
registry (events table) and counts rejections per reason in metrics; operators and tests match on
the code, so codes are part of the contract and must never be renamed.
"""

from __future__ import annotations

# Every reason a message can be refused for. Stable strings: stored in the DB and in metrics labels.
REASONS: frozenset[str] = frozenset(
    {
        "bad_topic",  # topic not under koala/v1, wrong shape, wildcard or odd characters
        "bad_device_id",  # device id empty, too long or with characters outside [A-Za-z0-9_.-]
        "bad_magic",  # binary frame does not start with the KOALA magic
        "bad_version",  # frame/envelope version this code does not speak
        "bad_kind",  # frame kind / message type unknown or not the one expected
        "bad_header",  # header missing, truncated, too large or not valid JSON object
        "bad_json",  # control message is not valid UTF-8 JSON object
        "bad_field",  # a field is missing, of the wrong type, or out of range
        "bad_dtype",  # tensor dtype not in the allow-list
        "bad_shape",  # shape x dtype != body bytes, or shape not what the round expects
        "bad_digest",  # sha256 of the body differs from the header
        "nan_or_inf",  # a tensor holds NaN or +-Inf (or float16 overflow on encode)
        "oversize",  # payload, header, list or string beyond its limit
        "wrong_round",  # result for a round that is not the one being collected
        "unknown_device",  # device not in the registry / not a participant
        "spoofed_device",  # device id in the payload differs from the id in the topic
        "revoked_device",  # device credentials revoked
        "late",  # result after the round deadline
        "duplicate",  # second distinct submission for the same (round, device)
        "rate_limited",  # more result messages for one (round, device) than the server takes
        "over_budget",  # a device sent more of one message kind than its budget; dropped before decoding
        "stale_version",  # result answers another model version than the one assigned
        "plan_mismatch",  # result carries tensors the plan did not ask for, or lacks one it did
        "bad_histogram",  # label histogram of the wrong length, negative, or not summing to num_samples
        "out_of_bounds",  # sample count or tensor magnitudes outside the bounds the server derives
    }
)


class ContractError(ValueError):
    """A message or topic violates the contract. `reason` is one of REASONS; `detail` is for humans."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:  # a typo here would silently create a new metrics label
            raise AssertionError(f"unknown ContractError reason {reason!r}")
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)

    def __reduce__(self) -> tuple[type[ContractError], tuple[str, str]]:  # keep picklable across processes with the two-argument constructor
        return (type(self), (self.reason, self.detail))
