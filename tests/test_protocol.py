"""Binary frame protocol: encoder, incremental decoder, counters and fuzzing."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from cobs import cobs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anomalyforge.errors import InvalidInputError
from anomalyforge.firmware_bridge.protocol import (
    CRC,
    HEADER,
    MAX_ENCODED_FRAME,
    MAX_PAYLOAD,
    ErrorMessage,
    FrameDecoder,
    FrameEncoder,
    Heartbeat,
    Hello,
    InferenceResult,
    Samples,
    build_body,
    encode_frame,
    next_sequence,
)
from anomalyforge.firmware_bridge.receiver import IndexedWindower

FUZZ = settings(derandomize=True, max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def sample_messages():
    rng = np.random.default_rng(1)
    return [
        Hello((1, 2, 300), 250.0, 1, "int16"),
        Samples(0, rng.integers(-32768, 32767, size=(35, 1)).astype(np.int16), 0.001),
        Samples(35, rng.standard_normal((35, 1)).astype(np.float32)),
        Samples(70, np.zeros((4, 3), dtype=np.int16), 1.0),
        InferenceResult(140, 0.125, True),
        ErrorMessage(2, "ADC overrun at 1 kHz"),
        Heartbeat(74, 3),
    ]


def assert_same_message(received, sent):
    assert type(received) is type(sent)
    if isinstance(sent, Samples):
        assert received.first_index == sent.first_index
        assert received.scale == pytest.approx(sent.scale, rel=1e-7)
        np.testing.assert_array_equal(received.data, sent.data)
        assert received.data.dtype == sent.data.dtype
    else:
        assert received == sent


def encode_all(messages, encoder=None):
    encoder = encoder or FrameEncoder()
    return b"".join(encoder.encode(message, timestamp_us=1000 * number) for number, message in enumerate(messages))


def test_crc_is_crc32_ieee():
    assert zlib.crc32(b"123456789") == 0xCBF43926


def test_roundtrip_all_message_types():
    messages = sample_messages()
    decoder = FrameDecoder()
    frames = decoder.feed(encode_all(messages))

    assert len(frames) == len(messages)
    for frame, message in zip(frames, messages):
        assert_same_message(frame.message, message)
    assert [frame.sequence for frame in frames] == list(range(len(messages)))
    assert [frame.timestamp_us for frame in frames] == [1000 * number for number in range(len(messages))]
    assert decoder.stats.frames_accepted == len(messages)
    assert decoder.stats.frames_rejected == 0
    assert decoder.stats.bytes_discarded == 0


def test_frame_layout_little_endian():
    frame = encode_frame(Heartbeat(0x01020304, 5), sequence=0x1234, timestamp_us=0x0A0B0C0D)
    assert frame.endswith(b"\x00")
    assert b"\x00" not in frame[:-1]
    body = cobs.decode(frame[:-1])

    assert body[:HEADER.size] == bytes([1, 0x05, 0x34, 0x12, 0x0D, 0x0C, 0x0B, 0x0A])
    assert body[HEADER.size:-CRC.size] == struct.pack("<II", 0x01020304, 5)
    assert body[-CRC.size:] == struct.pack("<I", zlib.crc32(body[:-CRC.size]))


def test_samples_values_apply_scale():
    message = Samples(0, np.array([[1000], [-2000]], dtype=np.int16), 0.5)
    np.testing.assert_array_equal(message.values(), np.array([[500.0], [-1000.0]], dtype=np.float32))


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1000])
def test_decoder_any_chunking(chunk):
    messages = sample_messages()
    stream = encode_all(messages)
    decoder = FrameDecoder()
    frames = []
    for start in range(0, len(stream), chunk):
        frames.extend(decoder.feed(stream[start:start + chunk]))

    assert len(frames) == len(messages)
    for frame, message in zip(frames, messages):
        assert_same_message(frame.message, message)


def test_partial_frame_waits_without_output():
    frame = encode_frame(Heartbeat(7), 1)
    decoder = FrameDecoder()

    assert decoder.feed(frame[:-3]) == []
    assert decoder.stats.frames_accepted == 0
    frames = decoder.feed(frame[-3:])
    assert [item.message for item in frames] == [Heartbeat(7)]


def test_crc_failure_counted_and_next_frame_kept():
    first = bytearray(encode_frame(Heartbeat(1), 1))
    first[3] ^= 0x10
    second = encode_frame(Heartbeat(2), 2)
    decoder = FrameDecoder()
    frames = decoder.feed(b"\x00" + bytes(first) + second)

    assert [frame.message for frame in frames] == [Heartbeat(2)]
    assert decoder.stats.crc_failures + decoder.stats.cobs_errors == 1
    assert decoder.stats.bytes_discarded == len(first)


def test_garbage_before_first_delimiter_not_counted_as_error():
    decoder = FrameDecoder()
    frames = decoder.feed(b"\x13\x37garbage" + encode_frame(Heartbeat(5), 9)[:-1] + b"\x00")

    # The garbage and the frame form one piece before the first delimiter, so both are lost
    # without a CRC failure being counted: the decoder may have started mid-frame.
    assert frames == []
    assert decoder.stats.crc_failures == 0
    assert decoder.stats.cobs_errors == 0
    assert decoder.stats.bytes_discarded > 0
    assert [frame.message for frame in decoder.feed(encode_frame(Heartbeat(6), 10))] == [Heartbeat(6)]


def test_oversize_frame_bounded_and_counted():
    decoder = FrameDecoder()
    for _ in range(50):
        decoder.feed(b"\x01" * 1000)
        assert len(decoder.pending) <= MAX_ENCODED_FRAME

    assert decoder.stats.oversize_frames == 1
    assert decoder.stats.bytes_discarded == 50_000
    frames = decoder.feed(b"\x00" + encode_frame(Heartbeat(3), 4))
    assert [frame.message for frame in frames] == [Heartbeat(3)]
    assert decoder.stats.bytes_discarded == 50_001


def test_oversize_piece_in_one_chunk():
    decoder = FrameDecoder()
    decoder.feed(b"\x00" + b"\x05" * (MAX_ENCODED_FRAME + 1) + b"\x00")

    assert decoder.stats.oversize_frames == 1
    assert decoder.stats.bytes_discarded == MAX_ENCODED_FRAME + 2


def test_version_mismatch_rejected():
    body = build_body(0x05, Heartbeat(1).encode_payload(), 1, 0, version=2)
    decoder = FrameDecoder()
    frames = decoder.feed(b"\x00" + cobs.encode(body) + b"\x00")

    assert frames == []
    assert decoder.stats.version_mismatches == 1


def test_unknown_type_skipped_but_sequenced():
    unknown = cobs.encode(build_body(0x7E, b"future payload", 1, 0)) + b"\x00"
    decoder = FrameDecoder()
    frames = decoder.feed(encode_frame(Heartbeat(0), 0) + unknown + encode_frame(Heartbeat(0), 2))

    assert [frame.sequence for frame in frames] == [0, 2]
    assert decoder.stats.unknown_types == 1
    assert decoder.stats.sequence_gaps == 0


def test_longer_payload_from_newer_firmware_accepted():
    payload = Heartbeat(9, 1).encode_payload() + b"appended field"
    decoder = FrameDecoder()
    frames = decoder.feed(cobs.encode(build_body(0x05, payload, 0, 0)) + b"\x00")

    assert [frame.message for frame in frames] == [Heartbeat(9, 1)]


def test_malformed_samples_payload_rejected():
    payload = Samples(0, np.zeros((2, 1), dtype=np.int16)).encode_payload() + b"\x01"
    decoder = FrameDecoder()
    frames = decoder.feed(cobs.encode(build_body(0x02, payload, 0, 0)) + b"\x00")

    assert frames == []
    assert decoder.stats.malformed_frames == 1


def test_sequence_gap_and_lost_samples():
    encoder = FrameEncoder()
    frames = [encoder.encode(Samples(35 * number, np.zeros((35, 1), dtype=np.float32))) for number in range(10)]
    stream = b"".join(frame for number, frame in enumerate(frames) if number not in (3, 4, 8))
    decoder = FrameDecoder()
    decoder.feed(stream)

    assert decoder.stats.sequence_gaps == 2
    assert decoder.stats.frames_missed == 3
    assert decoder.stats.sample_gaps == 2
    assert decoder.stats.samples_lost == 105
    assert decoder.stats.device_restarts == 0


def test_lost_tail_revealed_by_heartbeat():
    encoder = FrameEncoder()
    stream = encoder.encode(Samples(0, np.zeros((10, 1), dtype=np.float32)))
    encoder.encode(Samples(10, np.zeros((10, 1), dtype=np.float32)))
    stream += encoder.encode(Heartbeat(20))
    decoder = FrameDecoder()
    decoder.feed(stream)

    assert decoder.stats.samples_lost == 10


def test_sequence_wraps_to_one():
    assert next_sequence(0) == 1
    assert next_sequence(65534) == 65535
    assert next_sequence(65535) == 1
    decoder = FrameDecoder()
    frames = [encode_frame(Heartbeat(0), sequence) for sequence in (65534, 65535, 1, 2)]
    decoder.feed(b"".join(frames))

    assert decoder.stats.sequence_gaps == 0
    assert decoder.stats.device_restarts == 0


def test_reboot_resets_counting():
    encoder = FrameEncoder()
    stream = encoder.encode(Hello((1, 0, 0), 100.0, 1, "float32"))
    stream += encoder.encode(Samples(0, np.zeros((50, 1), dtype=np.float32)))
    encoder.reset()
    stream += encoder.encode(Hello((1, 0, 0), 100.0, 1, "float32"))
    stream += encoder.encode(Samples(0, np.zeros((50, 1), dtype=np.float32)))
    decoder = FrameDecoder()
    decoder.feed(stream)

    assert decoder.stats.device_restarts == 1
    assert decoder.stats.samples_lost == 0
    assert decoder.stats.sequence_gaps == 0


def test_reboot_detected_by_sample_index_without_hello():
    encoder = FrameEncoder()
    stream = encoder.encode(Samples(1000, np.zeros((5, 1), dtype=np.float32)))
    stream += encoder.encode(Samples(0, np.zeros((5, 1), dtype=np.float32)))
    decoder = FrameDecoder()
    decoder.feed(stream)

    assert decoder.stats.device_restarts == 1
    assert decoder.stats.samples_lost == 0


@pytest.mark.parametrize("message, match", [
    (Samples(0, np.zeros((600, 1), dtype=np.float32)), "payload of 2412 bytes exceeds the 1024-byte maximum"),
    (Samples(0, np.zeros((3, 1), dtype=np.float64)), "must be int16 or float32, got float64"),
    (Samples(-1, np.zeros((3, 1), dtype=np.int16)), r"first_index must lie in \[0, 4294967295\], got -1"),
    (Hello((1, 0, 0), 100.0, 0, "int16"), r"channels must lie in \[1, 255\], got 0"),
    (Hello((1, 0, 0), 100.0, 1, "int8"), "sample_format must be one of .*got 'int8'"),
    (ErrorMessage(1, "x" * MAX_PAYLOAD), "error text of 1024 UTF-8 bytes exceeds 1022"),
])
def test_encoder_rejects_invalid_messages(message, match):
    with pytest.raises(InvalidInputError, match=match):
        encode_frame(message, 1)


def test_largest_payload_fits_frame_limit():
    message = Samples(0, np.full((253, 1), 1.0, dtype=np.float32))
    frame = encode_frame(message, 1)

    assert len(message.encode_payload()) == MAX_PAYLOAD
    assert len(frame) - 1 <= MAX_ENCODED_FRAME
    assert len(FrameDecoder().feed(frame)) == 1


@FUZZ
@given(st.binary(max_size=4000))
def test_random_bytes_never_raise(data):
    decoder = FrameDecoder()
    decoder.feed(data)
    decoder.finish()

    assert len(decoder.pending) == 0
    assert decoder.stats.bytes_received == len(data)


@FUZZ
@given(st.lists(st.binary(max_size=300), max_size=20), st.integers(1, 64))
def test_random_chunks_stay_bounded(chunks, split):
    decoder = FrameDecoder()
    for chunk in chunks:
        for start in range(0, len(chunk), split):
            decoder.feed(chunk[start:start + split])
            assert len(decoder.pending) <= MAX_ENCODED_FRAME


@FUZZ
@given(st.binary(max_size=2000), st.integers(1, 50))
def test_valid_frames_after_garbage_recovered(garbage, chunk):
    messages = sample_messages()
    stream = garbage + b"\x00" + encode_all(messages)
    decoder = FrameDecoder()
    frames = []
    for start in range(0, len(stream), chunk):
        frames.extend(decoder.feed(stream[start:start + chunk]))

    assert len(frames) == len(messages)
    for frame, message in zip(frames, messages):
        assert_same_message(frame.message, message)


@FUZZ
@given(st.data())
def test_mutated_streams_never_raise_and_keep_intact_frames(data):
    encoder = FrameEncoder()
    frames = [encoder.encode(message) for message in sample_messages()]
    spoiled = data.draw(st.sets(st.integers(0, len(frames) - 1), max_size=3))
    mutated = []
    for number, frame in enumerate(frames):
        frame = bytearray(frame)
        if number in spoiled:
            operation = data.draw(st.sampled_from(["flip", "delete", "insert", "truncate"]))
            position = data.draw(st.integers(0, len(frame) - 2))
            if operation == "flip":
                frame[position] ^= 1 << data.draw(st.integers(0, 7))
            elif operation == "delete":
                del frame[position]
            elif operation == "insert":
                frame.insert(position, data.draw(st.integers(1, 255)))
            else:
                del frame[position:-1]
        mutated.append(bytes(frame))
    decoder = FrameDecoder()
    received = decoder.feed(b"".join(mutated))
    decoder.finish()

    received_sequences = {frame.sequence for frame in received}
    # A frame keeps its delimiter under these mutations, so every frame not touched arrives.
    assert set(range(len(frames))) - spoiled <= received_sequences
    assert decoder.stats.frames_accepted == len(received)


def test_indexed_windower_skips_windows_over_gaps():
    windower = IndexedWindower(window_length=4, hop=4)
    first = windower.push(0, np.arange(6))
    second = windower.push(10, np.arange(10, 20))

    assert [start for start, _ in first] == [0]
    assert [start for start, _ in second] == [12, 16]
    np.testing.assert_array_equal(second[0][1], [12, 13, 14, 15])
    assert windower.windows_skipped == 1


def test_indexed_windower_overlapping_hop():
    windower = IndexedWindower(window_length=4, hop=2)
    pairs = []
    for start in range(0, 12, 3):
        pairs.extend(windower.push(start, np.arange(start, start + 3)))

    assert [start for start, _ in pairs] == [0, 2, 4, 6, 8]
    for start, window in pairs:
        np.testing.assert_array_equal(window, np.arange(start, start + 4))
