/*
 * af_frame: C99 reference of the anomalyforge firmware frame protocol. See af_frame.h.
 */
#include "af_frame.h"

#include <string.h>

/* Floats are sent as their IEEE 754 binary32 bit pattern. */
typedef char af_float_is_32_bits[(sizeof(float) == 4u) ? 1 : -1];

static void put_u16(uint8_t *out, uint16_t value);
static void put_u32(uint8_t *out, uint32_t value);
static uint16_t get_u16(const uint8_t *in);
static uint32_t get_u32(const uint8_t *in);
static uint32_t float_bits(float value);
static float bits_float(uint32_t bits);

const char *af_status_name(af_status status)
{
#ifdef AF_NO_STATUS_NAMES
    (void)status;
    return "";
#else
    switch (status) {
    case AF_OK: return "ok";
    case AF_INCOMPLETE: return "incomplete";
    case AF_ERR_ARGUMENT: return "invalid argument";
    case AF_ERR_BUFFER_TOO_SMALL: return "buffer too small";
    case AF_ERR_PAYLOAD_TOO_LARGE: return "payload too large";
    case AF_ERR_COBS: return "invalid COBS encoding";
    case AF_ERR_SHORT_FRAME: return "frame too short";
    case AF_ERR_CRC: return "CRC mismatch";
    case AF_ERR_VERSION: return "unsupported protocol version";
    case AF_ERR_OVERSIZE: return "frame too long";
    case AF_ERR_MALFORMED: return "malformed payload";
    }
    return "unknown status";
#endif
}

static void put_u16(uint8_t *out, uint16_t value)
{
    out[0] = (uint8_t)(value & 0xFFu);
    out[1] = (uint8_t)(value >> 8);
}

static void put_u32(uint8_t *out, uint32_t value)
{
    out[0] = (uint8_t)(value & 0xFFu);
    out[1] = (uint8_t)((value >> 8) & 0xFFu);
    out[2] = (uint8_t)((value >> 16) & 0xFFu);
    out[3] = (uint8_t)(value >> 24);
}

static uint16_t get_u16(const uint8_t *in)
{
    return (uint16_t)(in[0] | (uint16_t)(in[1] << 8));
}

static uint32_t get_u32(const uint8_t *in)
{
    return (uint32_t)in[0] | ((uint32_t)in[1] << 8) | ((uint32_t)in[2] << 16) | ((uint32_t)in[3] << 24);
}

static uint32_t float_bits(float value)
{
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return bits;
}

static float bits_float(uint32_t bits)
{
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

uint32_t af_crc32_update(uint32_t crc, const uint8_t *data, size_t length)
{
    /* Bitwise, reflected polynomial 0xEDB88320: small code, no table in flash. */
    size_t index;
    crc = ~crc;
    for (index = 0; index < length; ++index) {
        unsigned bit;
        crc ^= data[index];
        for (bit = 0; bit < 8u; ++bit) {
            crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
        }
    }
    return ~crc;
}

uint16_t af_next_sequence(uint16_t sequence)
{
    return (sequence == 0xFFFFu) ? (uint16_t)1u : (uint16_t)(sequence + 1u);
}

/* COBS writer that takes data in pieces; blocks are opened lazily so that a run of
 * exactly 254 non-zero bytes at the end gets no empty trailing block. */
typedef struct {
    uint8_t *out;
    size_t capacity;
    size_t length;
    size_t code_position;
    uint8_t code;
    bool block_open;
    bool overflow;
} cobs_writer;

static void cobs_writer_init(cobs_writer *writer, uint8_t *out, size_t capacity)
{
    writer->out = out;
    writer->capacity = capacity;
    writer->length = 0;
    writer->code_position = 0;
    writer->code = 1;
    writer->block_open = false;
    writer->overflow = false;
}

static void cobs_open_block(cobs_writer *writer)
{
    if (writer->length >= writer->capacity) {
        writer->overflow = true;
        return;
    }
    writer->code_position = writer->length++;
    writer->code = 1;
    writer->block_open = true;
}

static void cobs_close_block(cobs_writer *writer)
{
    writer->out[writer->code_position] = writer->code;
    writer->block_open = false;
}

static void cobs_put(cobs_writer *writer, const uint8_t *data, size_t length)
{
    size_t index;
    for (index = 0; index < length && !writer->overflow; ++index) {
        if (!writer->block_open) {
            cobs_open_block(writer);
            if (writer->overflow) {
                return;
            }
        }
        if (data[index] == 0u) {
            cobs_close_block(writer);
            cobs_open_block(writer);
            continue;
        }
        if (writer->length >= writer->capacity) {
            writer->overflow = true;
            return;
        }
        writer->out[writer->length++] = data[index];
        writer->code++;
        if (writer->code == 0xFFu) {
            cobs_close_block(writer);
        }
    }
}

static void cobs_finish(cobs_writer *writer)
{
    if (writer->overflow) {
        return;
    }
    if (!writer->block_open && writer->length == 0u) {
        cobs_open_block(writer);
    }
    if (writer->block_open) {
        cobs_close_block(writer);
    }
}

af_status af_cobs_encode(const uint8_t *in, size_t in_length, uint8_t *out, size_t out_capacity,
                         size_t *out_length)
{
    cobs_writer writer;
    if ((in == NULL && in_length != 0u) || out == NULL || out_length == NULL) {
        return AF_ERR_ARGUMENT;
    }
    cobs_writer_init(&writer, out, out_capacity);
    cobs_put(&writer, in, in_length);
    cobs_finish(&writer);
    if (writer.overflow) {
        return AF_ERR_BUFFER_TOO_SMALL;
    }
    *out_length = writer.length;
    return AF_OK;
}

af_status af_cobs_decode(const uint8_t *in, size_t in_length, uint8_t *out, size_t out_capacity,
                         size_t *out_length)
{
    size_t read = 0;
    size_t written = 0;
    if ((in == NULL && in_length != 0u) || out == NULL || out_length == NULL) {
        return AF_ERR_ARGUMENT;
    }
    while (read < in_length) {
        uint8_t code = in[read++];
        size_t count;
        if (code == 0u) {
            return AF_ERR_COBS;
        }
        count = (size_t)code - 1u;
        if (count > in_length - read) {
            return AF_ERR_COBS;
        }
        if (count > out_capacity - written) {
            return AF_ERR_BUFFER_TOO_SMALL;
        }
        for (; count > 0u; --count) {
            uint8_t value = in[read++];
            if (value == 0u) {
                return AF_ERR_COBS;
            }
            /* In-place decoding is safe: written never passes read. */
            out[written++] = value;
        }
        if (code != 0xFFu && read < in_length) {
            if (written >= out_capacity) {
                return AF_ERR_BUFFER_TOO_SMALL;
            }
            out[written++] = 0u;
        }
    }
    *out_length = written;
    return AF_OK;
}

af_status af_frame_encode(const af_header *header, const uint8_t *payload, size_t payload_length,
                          uint8_t *out, size_t out_capacity, size_t *out_length)
{
    uint8_t head[AF_HEADER_SIZE];
    uint8_t crc_bytes[AF_CRC_SIZE];
    uint32_t crc;
    cobs_writer writer;
    if (header == NULL || out == NULL || out_length == NULL || (payload == NULL && payload_length != 0u)) {
        return AF_ERR_ARGUMENT;
    }
    if (payload_length > AF_MAX_PAYLOAD) {
        return AF_ERR_PAYLOAD_TOO_LARGE;
    }
    head[0] = (uint8_t)AF_PROTOCOL_VERSION;
    head[1] = header->type;
    put_u16(&head[2], header->sequence);
    put_u32(&head[4], header->timestamp_us);
    crc = af_crc32_update(0u, head, sizeof head);
    crc = af_crc32_update(crc, payload, payload_length);
    put_u32(crc_bytes, crc);

    cobs_writer_init(&writer, out, out_capacity);
    cobs_put(&writer, head, sizeof head);
    cobs_put(&writer, payload, payload_length);
    cobs_put(&writer, crc_bytes, sizeof crc_bytes);
    cobs_finish(&writer);
    if (writer.overflow || writer.length >= out_capacity) {
        return AF_ERR_BUFFER_TOO_SMALL;
    }
    out[writer.length++] = 0u;
    *out_length = writer.length;
    return AF_OK;
}

af_status af_decoder_init(af_decoder *decoder, uint8_t *buffer, size_t capacity)
{
    if (decoder == NULL || buffer == NULL) {
        return AF_ERR_ARGUMENT;
    }
    if (capacity < AF_MAX_ENCODED_FRAME) {
        return AF_ERR_BUFFER_TOO_SMALL;
    }
    memset(decoder, 0, sizeof *decoder);
    decoder->buffer = buffer;
    decoder->capacity = AF_MAX_ENCODED_FRAME;
    return AF_OK;
}

/* Count a rejected frame; before the first delimiter only its bytes are counted. */
static af_status reject(af_decoder *decoder, size_t size, af_status reason, uint32_t *counter)
{
    bool counted = decoder->synchronised;
    decoder->stats.bytes_discarded += (uint32_t)(size + 1u);
    decoder->synchronised = true;
    if (!counted) {
        return AF_INCOMPLETE;
    }
    (*counter)++;
    return reason;
}

static af_status decode_piece(af_decoder *decoder, af_frame *frame)
{
    size_t size = decoder->length;
    size_t body_length = 0;
    size_t crc_offset;
    af_status status;
    decoder->length = 0;
    if (size == 0u) {
        decoder->synchronised = true;
        return AF_INCOMPLETE;
    }
    status = af_cobs_decode(decoder->buffer, size, decoder->buffer, decoder->capacity, &body_length);
    if (status != AF_OK) {
        return reject(decoder, size, AF_ERR_COBS, &decoder->stats.cobs_errors);
    }
    if (body_length < AF_HEADER_SIZE + AF_CRC_SIZE) {
        return reject(decoder, size, AF_ERR_SHORT_FRAME, &decoder->stats.short_frames);
    }
    crc_offset = body_length - AF_CRC_SIZE;
    if (af_crc32_update(0u, decoder->buffer, crc_offset) != get_u32(&decoder->buffer[crc_offset])) {
        return reject(decoder, size, AF_ERR_CRC, &decoder->stats.crc_failures);
    }
    if (decoder->buffer[0] != AF_PROTOCOL_VERSION) {
        return reject(decoder, size, AF_ERR_VERSION, &decoder->stats.version_mismatches);
    }
    decoder->synchronised = true;
    frame->header.version = decoder->buffer[0];
    frame->header.type = decoder->buffer[1];
    frame->header.sequence = get_u16(&decoder->buffer[2]);
    frame->header.timestamp_us = get_u32(&decoder->buffer[4]);
    frame->payload = &decoder->buffer[AF_HEADER_SIZE];
    frame->payload_length = crc_offset - AF_HEADER_SIZE;
    decoder->stats.frames_accepted++;
    return AF_OK;
}

af_status af_decoder_push(af_decoder *decoder, uint8_t byte, af_frame *frame)
{
    if (decoder == NULL || frame == NULL || decoder->buffer == NULL) {
        return AF_ERR_ARGUMENT;
    }
    if (byte == 0u) {
        if (decoder->discarding) {
            /* The delimiter ends the oversize run, which was counted when it began. */
            decoder->discarding = false;
            decoder->stats.bytes_discarded++;
            return AF_INCOMPLETE;
        }
        return decode_piece(decoder, frame);
    }
    if (decoder->discarding) {
        decoder->stats.bytes_discarded++;
        return AF_INCOMPLETE;
    }
    if (decoder->length >= decoder->capacity) {
        decoder->stats.oversize_frames++;
        decoder->stats.bytes_discarded += (uint32_t)(decoder->length + 1u);
        decoder->length = 0;
        decoder->discarding = true;
        decoder->synchronised = true;
        return AF_ERR_OVERSIZE;
    }
    decoder->buffer[decoder->length++] = byte;
    return AF_INCOMPLETE;
}

static af_status check_output(uint8_t *out, size_t out_capacity, size_t *out_length, size_t needed)
{
    if (out == NULL || out_length == NULL) {
        return AF_ERR_ARGUMENT;
    }
    if (needed > AF_MAX_PAYLOAD) {
        return AF_ERR_PAYLOAD_TOO_LARGE;
    }
    if (needed > out_capacity) {
        return AF_ERR_BUFFER_TOO_SMALL;
    }
    return AF_OK;
}

af_status af_hello_write(const af_hello *hello, uint8_t *out, size_t out_capacity, size_t *out_length)
{
    af_status status = check_output(out, out_capacity, out_length, AF_HELLO_SIZE);
    if (status != AF_OK) {
        return status;
    }
    if (hello == NULL || hello->channels == 0u ||
        (hello->sample_format != AF_FORMAT_INT16 && hello->sample_format != AF_FORMAT_FLOAT32) ||
        !(hello->sample_rate_hz >= 0.0f)) {
        return AF_ERR_ARGUMENT;
    }
    out[0] = hello->firmware_major;
    out[1] = hello->firmware_minor;
    put_u16(&out[2], hello->firmware_patch);
    put_u32(&out[4], float_bits(hello->sample_rate_hz));
    out[8] = hello->channels;
    out[9] = hello->sample_format;
    put_u16(&out[10], 0u);
    *out_length = AF_HELLO_SIZE;
    return AF_OK;
}

af_status af_hello_read(const uint8_t *payload, size_t payload_length, af_hello *hello)
{
    if (payload == NULL || hello == NULL) {
        return AF_ERR_ARGUMENT;
    }
    /* Longer payloads come from newer firmware that appended fields: they are ignored. */
    if (payload_length < AF_HELLO_SIZE) {
        return AF_ERR_MALFORMED;
    }
    hello->firmware_major = payload[0];
    hello->firmware_minor = payload[1];
    hello->firmware_patch = get_u16(&payload[2]);
    hello->sample_rate_hz = bits_float(get_u32(&payload[4]));
    hello->channels = payload[8];
    hello->sample_format = payload[9];
    if (hello->channels == 0u ||
        (hello->sample_format != AF_FORMAT_INT16 && hello->sample_format != AF_FORMAT_FLOAT32)) {
        return AF_ERR_MALFORMED;
    }
    return AF_OK;
}

static af_status samples_header(uint32_t first_index, uint8_t channels, uint8_t format, float scale,
                                size_t n_samples, size_t value_size, uint8_t *out, size_t out_capacity,
                                size_t *out_length, size_t *total)
{
    af_status status;
    if (channels == 0u || n_samples == 0u) {
        return AF_ERR_ARGUMENT;
    }
    /* Checked before multiplying so that the size cannot wrap around. */
    if (n_samples > AF_MAX_PAYLOAD / ((size_t)channels * value_size)) {
        return AF_ERR_PAYLOAD_TOO_LARGE;
    }
    *total = AF_SAMPLES_HEADER_SIZE + n_samples * channels * value_size;
    status = check_output(out, out_capacity, out_length, *total);
    if (status != AF_OK) {
        return status;
    }
    put_u32(&out[0], first_index);
    out[4] = channels;
    out[5] = format;
    put_u16(&out[6], 0u);
    put_u32(&out[8], float_bits(scale));
    return AF_OK;
}

af_status af_samples_write_int16(uint32_t first_index, uint8_t channels, float scale, const int16_t *values,
                                 size_t n_samples, uint8_t *out, size_t out_capacity, size_t *out_length)
{
    size_t total = 0;
    size_t index;
    af_status status;
    if (values == NULL) {
        return AF_ERR_ARGUMENT;
    }
    status = samples_header(first_index, channels, AF_FORMAT_INT16, scale, n_samples, 2u, out, out_capacity,
                            out_length, &total);
    if (status != AF_OK) {
        return status;
    }
    for (index = 0; index < n_samples * channels; ++index) {
        put_u16(&out[AF_SAMPLES_HEADER_SIZE + 2u * index], (uint16_t)values[index]);
    }
    *out_length = total;
    return AF_OK;
}

af_status af_samples_write_float32(uint32_t first_index, uint8_t channels, const float *values,
                                   size_t n_samples, uint8_t *out, size_t out_capacity, size_t *out_length)
{
    size_t total = 0;
    size_t index;
    af_status status;
    if (values == NULL) {
        return AF_ERR_ARGUMENT;
    }
    status = samples_header(first_index, channels, AF_FORMAT_FLOAT32, 1.0f, n_samples, 4u, out, out_capacity,
                            out_length, &total);
    if (status != AF_OK) {
        return status;
    }
    for (index = 0; index < n_samples * channels; ++index) {
        put_u32(&out[AF_SAMPLES_HEADER_SIZE + 4u * index], float_bits(values[index]));
    }
    *out_length = total;
    return AF_OK;
}

af_status af_heartbeat_write(uint32_t next_sample_index, uint32_t tx_frames_dropped, uint8_t *out,
                             size_t out_capacity, size_t *out_length)
{
    af_status status = check_output(out, out_capacity, out_length, AF_HEARTBEAT_SIZE);
    if (status != AF_OK) {
        return status;
    }
    put_u32(&out[0], next_sample_index);
    put_u32(&out[4], tx_frames_dropped);
    *out_length = AF_HEARTBEAT_SIZE;
    return AF_OK;
}

af_status af_inference_result_write(uint32_t window_start_index, float score, bool is_anomaly, uint8_t *out,
                                    size_t out_capacity, size_t *out_length)
{
    af_status status = check_output(out, out_capacity, out_length, AF_INFERENCE_RESULT_SIZE);
    if (status != AF_OK) {
        return status;
    }
    put_u32(&out[0], window_start_index);
    put_u32(&out[4], float_bits(score));
    out[8] = is_anomaly ? (uint8_t)AF_INFERENCE_FLAG_ANOMALY : (uint8_t)0u;
    *out_length = AF_INFERENCE_RESULT_SIZE;
    return AF_OK;
}

af_status af_error_write(uint16_t code, const char *text, size_t text_length, uint8_t *out,
                         size_t out_capacity, size_t *out_length)
{
    af_status status;
    if (text == NULL && text_length != 0u) {
        return AF_ERR_ARGUMENT;
    }
    if (text_length > AF_MAX_PAYLOAD - AF_ERROR_HEADER_SIZE) {
        return AF_ERR_PAYLOAD_TOO_LARGE;
    }
    status = check_output(out, out_capacity, out_length, AF_ERROR_HEADER_SIZE + text_length);
    if (status != AF_OK) {
        return status;
    }
    put_u16(&out[0], code);
    if (text_length != 0u) {
        memcpy(&out[AF_ERROR_HEADER_SIZE], text, text_length);
    }
    *out_length = AF_ERROR_HEADER_SIZE + text_length;
    return AF_OK;
}
