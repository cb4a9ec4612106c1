"""C99 reference of the frame protocol: warning-free build, sanitizers, cross-language vectors.

Each test compiles ``af_frame.c`` with a small host program (below) that encodes frames
from hex payloads, builds messages with the C payload writers, or decodes a hex stream
byte by byte. Python and C must agree on every vector, corrupted ones included.
"""

from __future__ import annotations

import shutil
import subprocess
from importlib import resources

import numpy as np
import pytest
from cobs import cobs

from anomalyforge.firmware_bridge.cli import C_SOURCE_FILES, write_c_sources
from anomalyforge.firmware_bridge.protocol import (
    MAX_ENCODED_FRAME,
    ErrorMessage,
    FrameDecoder,
    FrameEncoder,
    Heartbeat,
    Hello,
    InferenceResult,
    Samples,
    build_body,
)

GCC = shutil.which("gcc")
pytestmark = pytest.mark.skipif(GCC is None, reason="gcc is not installed, so the C reference cannot be built")

STRICT_FLAGS = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-O2"]
SANITIZER_FLAGS = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-O1", "-g",
                   "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]

HOST_PROGRAM = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "af_frame.h"

static uint8_t scratch[1u << 20];

static size_t parse_hex(const char *text, uint8_t *out, size_t capacity)
{
    size_t length = 0;
    while (text[0] && text[1] && text[0] != '\n' && length < capacity) {
        unsigned value;
        if (sscanf(text, "%2x", &value) != 1) break;
        out[length++] = (uint8_t)value;
        text += 2;
    }
    return length;
}

static void print_hex(const uint8_t *data, size_t length)
{
    size_t index;
    for (index = 0; index < length; ++index) printf("%02x", data[index]);
}

static int encode_lines(void)
{
    static char line[1u << 16];
    static uint8_t payload[4096];
    uint8_t frame[AF_MAX_WIRE_FRAME];
    while (fgets(line, sizeof line, stdin)) {
        unsigned type, sequence;
        unsigned long timestamp;
        char hex[8192];
        size_t payload_length, frame_length = 0;
        af_header header;
        af_status status;
        if (sscanf(line, "%u %u %lu %8191s", &type, &sequence, &timestamp, hex) != 4) return 2;
        payload_length = (strcmp(hex, "-") == 0) ? 0 : parse_hex(hex, payload, sizeof payload);
        header.version = 0;
        header.type = (uint8_t)type;
        header.sequence = (uint16_t)sequence;
        header.timestamp_us = (uint32_t)timestamp;
        status = af_frame_encode(&header, payload, payload_length, frame, sizeof frame, &frame_length);
        if (status != AF_OK) {
            printf("ERR %s\n", af_status_name(status));
            continue;
        }
        print_hex(frame, frame_length);
        printf("\n");
    }
    return 0;
}

static int emit(uint8_t type, uint16_t sequence, const uint8_t *payload, size_t length)
{
    uint8_t frame[AF_MAX_WIRE_FRAME];
    size_t frame_length = 0;
    af_header header = {0, 0, 0, 0};
    header.type = type;
    header.sequence = sequence;
    header.timestamp_us = 1000u * sequence;
    if (af_frame_encode(&header, payload, length, frame, sizeof frame, &frame_length) != AF_OK) return 1;
    print_hex(frame, frame_length);
    return 0;
}

static int encode_messages(void)
{
    uint8_t payload[AF_MAX_PAYLOAD];
    size_t length = 0;
    int16_t counts[35];
    float volts[3] = {0.5f, -1.25f, 3.0e-5f};
    af_hello hello = {1, 2, 300, 250.0f, 1, AF_FORMAT_INT16};
    size_t index;
    uint8_t small[4];
    int failures = 0;
    for (index = 0; index < 35; ++index) counts[index] = (int16_t)(index * 937 - 16000);
    failures += af_hello_write(&hello, payload, sizeof payload, &length) != AF_OK;
    failures += emit(AF_MSG_HELLO, 0, payload, length);
    failures += af_samples_write_int16(0, 1, 0.001f, counts, 35, payload, sizeof payload, &length) != AF_OK;
    failures += emit(AF_MSG_SAMPLES, 1, payload, length);
    failures += af_samples_write_float32(35, 1, volts, 3, payload, sizeof payload, &length) != AF_OK;
    failures += emit(AF_MSG_SAMPLES, 2, payload, length);
    failures += af_inference_result_write(140, 0.125f, true, payload, sizeof payload, &length) != AF_OK;
    failures += emit(AF_MSG_INFERENCE_RESULT, 3, payload, length);
    failures += af_error_write(2, "ADC overrun", 11, payload, sizeof payload, &length) != AF_OK;
    failures += emit(AF_MSG_ERROR, 4, payload, length);
    failures += af_heartbeat_write(38, 3, payload, sizeof payload, &length) != AF_OK;
    failures += emit(AF_MSG_HEARTBEAT, 5, payload, length);
    printf("\n");
    /* Every writer must refuse a buffer that is too small and a payload that is too large. */
    failures += af_heartbeat_write(1, 1, small, sizeof small, &length) != AF_ERR_BUFFER_TOO_SMALL;
    failures += af_samples_write_int16(0, 1, 1.0f, counts, 600, payload, sizeof payload, &length)
                != AF_ERR_PAYLOAD_TOO_LARGE;
    failures += af_samples_write_int16(0, 0, 1.0f, counts, 3, payload, sizeof payload, &length) != AF_ERR_ARGUMENT;
    failures += af_cobs_encode((const uint8_t *)counts, 70, small, sizeof small, &length)
                != AF_ERR_BUFFER_TOO_SMALL;
    failures += af_hello_read(payload, 3, &hello) != AF_ERR_MALFORMED;
    printf("CHECKS %d\n", failures);
    return failures != 0;
}

static int decode_stream(void)
{
    static char line[1u << 22];
    static uint8_t buffer[AF_MAX_ENCODED_FRAME];
    af_decoder decoder;
    af_frame frame;
    size_t length, index;
    if (!fgets(line, sizeof line, stdin)) return 2;
    length = parse_hex(line, scratch, sizeof scratch);
    if (af_decoder_init(&decoder, buffer, sizeof buffer) != AF_OK) return 3;
    for (index = 0; index < length; ++index) {
        af_status status = af_decoder_push(&decoder, scratch[index], &frame);
        if (status == AF_OK) {
            printf("FRAME %u %u %lu ", frame.header.type, frame.header.sequence,
                   (unsigned long)frame.header.timestamp_us);
            if (frame.payload_length == 0) printf("-");
            print_hex(frame.payload, frame.payload_length);
            printf("\n");
        }
    }
    printf("STATS %lu %lu %lu %lu %lu %lu %lu\n",
           (unsigned long)decoder.stats.frames_accepted, (unsigned long)decoder.stats.crc_failures,
           (unsigned long)decoder.stats.cobs_errors, (unsigned long)decoder.stats.oversize_frames,
           (unsigned long)decoder.stats.short_frames, (unsigned long)decoder.stats.version_mismatches,
           (unsigned long)decoder.stats.bytes_discarded);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 2) return 2;
    if (strcmp(argv[1], "encode") == 0) return encode_lines();
    if (strcmp(argv[1], "messages") == 0) return encode_messages();
    if (strcmp(argv[1], "decode") == 0) return decode_stream();
    return 2;
}
"""


@pytest.fixture(scope="module", params=["strict", "sanitizers"])
def host_program(request, tmp_path_factory):
    """Path of the host program built with the strict flags or with ASan + UBSan."""
    directory = tmp_path_factory.mktemp(f"c_{request.param}")
    write_c_sources(directory)
    (directory / "host.c").write_text(HOST_PROGRAM)
    flags = STRICT_FLAGS if request.param == "strict" else SANITIZER_FLAGS
    library = subprocess.run([GCC, *flags, "-c", "af_frame.c", "-o", "af_frame.o"], cwd=directory,
                             capture_output=True, text=True)
    assert library.returncode == 0, library.stderr
    assert library.stderr == "", f"warnings for af_frame.c: {library.stderr}"
    # The host program uses stdio, so it is built without -pedantic but with the same sanitizers.
    host_flags = [flag for flag in flags if flag != "-pedantic"]
    build = subprocess.run([GCC, *host_flags, "host.c", "af_frame.o", "-o", "host"], cwd=directory,
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    return directory / "host"


def run_host(program, mode: str, text: str) -> list[str]:
    result = subprocess.run([str(program), mode], input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"host {mode} failed: {result.stderr}"
    assert "runtime error" not in result.stderr, result.stderr
    return result.stdout.splitlines()


def vector_messages() -> list:
    rng = np.random.default_rng(7)
    return [
        Hello((1, 0, 2), 140.0, 1, "float32"),
        Samples(0, rng.standard_normal((35, 1)).astype(np.float32)),
        Samples(35, rng.integers(-32768, 32767, (200, 1)).astype(np.int16), 0.002),
        Samples(235, np.zeros((300, 1), dtype=np.int16)),          # long runs of zero bytes
        Samples(535, np.full((253, 1), -1.0, dtype=np.float32)),   # maximum payload
        InferenceResult(140, 3.5, False),
        ErrorMessage(4, "watchdog"),
        Heartbeat(788, 0),
    ]


def python_frames(stream: bytes):
    decoder = FrameDecoder()
    frames = decoder.feed(stream)
    records = [f"FRAME {frame.message.msg_type} {frame.sequence} {frame.timestamp_us} "
               f"{frame.message.encode_payload().hex() or '-'}" for frame in frames]
    return records, decoder.stats


def c_source_text() -> str:
    return resources.files("anomalyforge.firmware_bridge").joinpath("c", "af_frame.c").read_text()


def test_c_sources_written_by_cli(tmp_path):
    written = write_c_sources(tmp_path / "firmware")

    assert [path.name for path in written] == list(C_SOURCE_FILES)
    assert "af_decoder_push" in (tmp_path / "firmware" / "af_frame.h").read_text()


def test_c_library_uses_no_heap_or_stdio():
    source = c_source_text()
    for forbidden in ("malloc", "free(", "printf", "#include <stdio.h>"):
        assert forbidden not in source


def test_c_encoder_matches_python(host_program):
    messages = vector_messages()
    lines = [f"{message.msg_type} {sequence} {sequence * 977} {message.encode_payload().hex()}"
             for sequence, message in enumerate(messages)]
    lines.append(f"5 9 0 {'00' * 1025}")
    output = run_host(host_program, "encode", "\n".join(lines) + "\n")

    encoder = FrameEncoder()
    expected = [encoder.encode(message, sequence * 977).hex() for sequence, message in enumerate(messages)]
    assert output[:-1] == expected
    assert output[-1] == "ERR payload too large"


def test_c_payload_writers_decoded_by_python(host_program):
    output = run_host(host_program, "messages", "")
    assert output[1] == "CHECKS 0"
    frames = FrameDecoder().feed(bytes.fromhex(output[0]))

    messages = [frame.message for frame in frames]
    assert [type(message).__name__ for message in messages] == [
        "Hello", "Samples", "Samples", "InferenceResult", "ErrorMessage", "Heartbeat"]
    assert messages[0] == Hello((1, 2, 300), 250.0, 1, "int16")
    np.testing.assert_array_equal(messages[1].data[:, 0], np.arange(35) * 937 - 16000)
    assert messages[1].scale == pytest.approx(0.001)
    np.testing.assert_array_equal(messages[2].data[:, 0], np.array([0.5, -1.25, 3.0e-5], dtype=np.float32))
    assert messages[2].first_index == 35
    assert messages[3] == InferenceResult(140, 0.125, True)
    assert messages[4] == ErrorMessage(2, "ADC overrun")
    assert messages[5] == Heartbeat(38, 3)
    assert [frame.sequence for frame in frames] == list(range(6))


def corrupted_streams() -> dict:
    """Python-encoded streams with known faults, keyed by the fault."""
    encoder = FrameEncoder()
    frames = [encoder.encode(message, 10 * number) for number, message in enumerate(vector_messages())]
    clean = b"".join(frames)
    flipped = bytearray(frames[1])
    flipped[20] ^= 0x04
    deleted = bytearray(frames[2])
    del deleted[100]
    bad_cobs = bytearray(frames[5])
    bad_cobs[0] = 0xFE                                   # code byte that runs past the end
    wrong_version = cobs.encode(build_body(0x05, Heartbeat(1).encode_payload(), 40, 0, version=9)) + b"\x00"
    short = cobs.encode(b"\x01\x05\x00") + b"\x00"
    return {
        "clean": clean,
        "leading_garbage": b"\x55\xaa\x10\x01garbage" + clean,
        "bit_flip": b"".join([frames[0], bytes(flipped), *frames[2:]]),
        "deleted_byte": b"".join([*frames[:2], bytes(deleted), *frames[3:]]),
        "bad_cobs_code": b"".join([*frames[:5], bytes(bad_cobs), *frames[6:]]),
        "wrong_version_and_short": b"".join([frames[0], wrong_version, short, *frames[1:]]),
        "oversize_run": frames[0] + b"\x07" * (MAX_ENCODED_FRAME + 500) + b"\x00" + b"".join(frames[1:]),
        "truncated_tail": clean + frames[3][:50],
        "delimiters_only": b"\x00" * 20,
        "random": np.random.default_rng(3).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
    }


@pytest.mark.parametrize("fault", list(corrupted_streams()))
def test_c_decoder_matches_python(host_program, fault):
    stream = corrupted_streams()[fault]
    output = run_host(host_program, "decode", stream.hex() + "\n")

    expected_frames, stats = python_frames(stream)
    c_frames = [line for line in output if line.startswith("FRAME")]
    assert c_frames == expected_frames
    c_stats = [int(value) for value in output[-1].split()[1:]]
    # Python discards a partial frame left at the end only in finish(), which is not called here.
    assert c_stats == [stats.frames_accepted, stats.crc_failures, stats.cobs_errors, stats.oversize_frames,
                       stats.short_frames, stats.version_mismatches, stats.bytes_discarded]
    if fault == "clean":
        assert len(c_frames) == len(vector_messages())
    if fault in ("bit_flip", "deleted_byte", "bad_cobs_code"):
        assert len(c_frames) == len(vector_messages()) - 1
