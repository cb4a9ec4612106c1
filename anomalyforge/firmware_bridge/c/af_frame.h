/*
 * af_frame: C99 reference of the anomalyforge firmware frame protocol, version 1.
 *
 * Wire format: COBS(header + payload + CRC-32) followed by one 0x00 delimiter. Header:
 * version u8, message type u8, sequence u16, device timestamp in microseconds u32. The
 * CRC-32 is the IEEE 802.3 / zlib CRC over header and payload. Every multi-byte field
 * is little-endian, whatever the byte order of the CPU. See docs/protocol.md.
 *
 * No heap, no stdio: every function works on buffers the caller provides and checks
 * each length before it writes. Functions return an af_status; AF_OK is 0.
 */
#ifndef AF_FRAME_H
#define AF_FRAME_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define AF_PROTOCOL_VERSION 1u
#define AF_HEADER_SIZE 8u
#define AF_CRC_SIZE 4u
#define AF_MAX_PAYLOAD 1024u
#define AF_MAX_BODY (AF_HEADER_SIZE + AF_MAX_PAYLOAD + AF_CRC_SIZE)
/* COBS adds one code byte per started run of 254 data bytes. */
#define AF_MAX_ENCODED_FRAME (AF_MAX_BODY + (AF_MAX_BODY + 253u) / 254u)
/* Largest frame on the wire, delimiter included: the size of a transmit buffer. */
#define AF_MAX_WIRE_FRAME (AF_MAX_ENCODED_FRAME + 1u)

#define AF_MSG_HELLO 0x01u
#define AF_MSG_SAMPLES 0x02u
#define AF_MSG_INFERENCE_RESULT 0x03u
#define AF_MSG_ERROR 0x04u
#define AF_MSG_HEARTBEAT 0x05u

#define AF_FORMAT_INT16 1u
#define AF_FORMAT_FLOAT32 2u

#define AF_HELLO_SIZE 12u
#define AF_SAMPLES_HEADER_SIZE 12u
#define AF_INFERENCE_RESULT_SIZE 9u
#define AF_HEARTBEAT_SIZE 8u
#define AF_ERROR_HEADER_SIZE 2u
#define AF_INFERENCE_FLAG_ANOMALY 0x01u

typedef enum {
    AF_OK = 0,
    AF_INCOMPLETE,           /* the decoder needs more bytes; not an error */
    AF_ERR_ARGUMENT,         /* NULL pointer or a value out of range */
    AF_ERR_BUFFER_TOO_SMALL, /* the output buffer cannot hold the result */
    AF_ERR_PAYLOAD_TOO_LARGE,/* payload over AF_MAX_PAYLOAD bytes */
    AF_ERR_COBS,             /* invalid COBS encoding */
    AF_ERR_SHORT_FRAME,      /* decoded frame shorter than header + CRC */
    AF_ERR_CRC,              /* CRC mismatch */
    AF_ERR_VERSION,          /* another protocol version */
    AF_ERR_OVERSIZE,         /* over AF_MAX_ENCODED_FRAME bytes without a delimiter */
    AF_ERR_MALFORMED         /* payload too short for its message type */
} af_status;

/* Name of a status, for logs. Define AF_NO_STATUS_NAMES to compile the strings out. */
const char *af_status_name(af_status status);

typedef struct {
    uint8_t version;
    uint8_t type;
    uint16_t sequence;
    uint32_t timestamp_us;
} af_header;

/* CRC-32 (IEEE 802.3, reflected, as zlib): start with crc = 0, feed pieces in order. */
uint32_t af_crc32_update(uint32_t crc, const uint8_t *data, size_t length);

/* COBS encode / decode. out_capacity is checked; *out_length is set on AF_OK only.
 * Decoding may run in place (out == in) because the output is never longer. */
af_status af_cobs_encode(const uint8_t *in, size_t in_length, uint8_t *out, size_t out_capacity,
                         size_t *out_length);
af_status af_cobs_decode(const uint8_t *in, size_t in_length, uint8_t *out, size_t out_capacity,
                         size_t *out_length);

/* Sequence number after `sequence`: 65535 wraps to 1 because 0 marks the first frame after boot. */
uint16_t af_next_sequence(uint16_t sequence);

/* Write one complete frame (COBS body and 0x00 delimiter) into out.
 * header->version is ignored and AF_PROTOCOL_VERSION is written. AF_MAX_WIRE_FRAME bytes
 * of out always suffice. */
af_status af_frame_encode(const af_header *header, const uint8_t *payload, size_t payload_length,
                          uint8_t *out, size_t out_capacity, size_t *out_length);

typedef struct {
    uint32_t frames_accepted;
    uint32_t crc_failures;
    uint32_t cobs_errors;
    uint32_t oversize_frames;
    uint32_t short_frames;
    uint32_t version_mismatches;
    uint32_t bytes_discarded;
} af_decoder_stats;

/* Incremental decoder over a caller buffer of at least AF_MAX_ENCODED_FRAME bytes. */
typedef struct {
    uint8_t *buffer;
    size_t capacity;
    size_t length;
    bool discarding;
    bool synchronised; /* false until the first delimiter: the first piece may be a partial frame */
    af_decoder_stats stats;
} af_decoder;

typedef struct {
    af_header header;
    const uint8_t *payload; /* points into the decoder buffer; valid until the next push */
    size_t payload_length;
} af_frame;

af_status af_decoder_init(af_decoder *decoder, uint8_t *buffer, size_t capacity);

/* Feed one received byte. Returns AF_OK with *frame filled when it completes a valid frame,
 * AF_INCOMPLETE when more bytes are needed, or the reason a completed frame was rejected
 * (also counted in decoder->stats). A rejected partial frame before the first delimiter
 * returns AF_INCOMPLETE and counts only as discarded bytes. */
af_status af_decoder_push(af_decoder *decoder, uint8_t byte, af_frame *frame);

/* Payload writers: each writes into out (out_capacity checked) and sets *out_length. */
typedef struct {
    uint8_t firmware_major;
    uint8_t firmware_minor;
    uint16_t firmware_patch;
    float sample_rate_hz;
    uint8_t channels;
    uint8_t sample_format; /* AF_FORMAT_INT16 or AF_FORMAT_FLOAT32 */
} af_hello;

af_status af_hello_write(const af_hello *hello, uint8_t *out, size_t out_capacity, size_t *out_length);
af_status af_hello_read(const uint8_t *payload, size_t payload_length, af_hello *hello);

/* Samples payload of n_samples rows of `channels` int16 values (scale: physical value per step). */
af_status af_samples_write_int16(uint32_t first_index, uint8_t channels, float scale, const int16_t *values,
                                 size_t n_samples, uint8_t *out, size_t out_capacity, size_t *out_length);
af_status af_samples_write_float32(uint32_t first_index, uint8_t channels, const float *values,
                                   size_t n_samples, uint8_t *out, size_t out_capacity, size_t *out_length);

af_status af_heartbeat_write(uint32_t next_sample_index, uint32_t tx_frames_dropped, uint8_t *out,
                             size_t out_capacity, size_t *out_length);
af_status af_inference_result_write(uint32_t window_start_index, float score, bool is_anomaly, uint8_t *out,
                                    size_t out_capacity, size_t *out_length);
af_status af_error_write(uint16_t code, const char *text, size_t text_length, uint8_t *out,
                         size_t out_capacity, size_t *out_length);

#ifdef __cplusplus
}
#endif

#endif /* AF_FRAME_H */
