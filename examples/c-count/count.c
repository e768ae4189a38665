/*
 * The word count's `count` operator in C: a running count per word (key),
 * emitted as "<word> <count>" on every update. Same state name, kind,
 * schema version and encoding (the count as JSON, i.e. its decimal digits)
 * as the Rust `count`, so a savepoint of either restores into the other.
 * Its count expires after 30 days without the word (a TTL, declared in
 * `describe`; a job file's `state_ttl` changes it).
 *
 * Bindings: `weir plugin bindings c gen/` (operator_plugin.h/.c). Built
 * with clang for wasm32-wasi as a reactor, without libc I/O, so the
 * component imports no WASI at all (see build.sh).
 *
 * Ownership, as the canonical ABI and wit-bindgen's C generator define it:
 * arguments of imported functions are borrowed (the host copies them);
 * arguments of exported functions belong to the callee (free them);
 * values an export returns are freed by the generated post-return, so
 * they must be heap-allocated.
 */

#include <stdlib.h>
#include <string.h>

#include "operator_plugin.h"

static operator_plugin_string_t COUNT = {(uint8_t *)"count", 5};

/* Sets `err` to a copy of `message` and reports failure. */
static bool fail(operator_plugin_string_t *err, const char *message) {
    operator_plugin_string_dup(err, message);
    return false;
}

/* The stored count: JSON of an unsigned integer, i.e. its decimal digits. */
static bool parse_count(const uint8_t *digits, size_t len, uint64_t *out) {
    uint64_t n = 0;
    if (len == 0) return false;
    for (size_t i = 0; i < len; i++) {
        if (digits[i] < '0' || digits[i] > '9') return false;
        n = n * 10 + (uint64_t)(digits[i] - '0');
    }
    *out = n;
    return true;
}

/* Writes `n` in decimal into `out` (at least 20 bytes); returns the length. */
static size_t format_count(uint64_t n, uint8_t *out) {
    uint8_t reversed[20];
    size_t len = 0;
    do {
        reversed[len++] = (uint8_t)('0' + n % 10);
        n /= 10;
    } while (n > 0);
    for (size_t i = 0; i < len; i++) out[i] = reversed[len - 1 - i];
    return len;
}

bool exports_weir_operator_operator_open(operator_plugin_string_t *config,
                                         operator_plugin_string_t *err) {
    (void)err;
    operator_plugin_string_free(config);
    return true;
}

bool exports_weir_operator_operator_process(uint32_t input,
                                            exports_weir_operator_operator_record_t *record,
                                            operator_plugin_string_t *err) {
    (void)input;
    uint64_t count = 0;
    operator_plugin_list_u8_t stored;
    if (weir_operator_state_value_get(&COUNT, &stored)) {
        bool ok = parse_count(stored.ptr, stored.len, &count);
        operator_plugin_list_u8_free(&stored);
        if (!ok) {
            exports_weir_operator_operator_record_free(record);
            return fail(err, "state `count` does not hold a count");
        }
    }
    count += 1;

    uint8_t digits[20];
    size_t digits_len = format_count(count, digits);
    operator_plugin_list_u8_t value = {digits, digits_len};
    weir_operator_state_value_set(&COUNT, &value);

    /* "<word> <count>", the word being the key (or the value if unkeyed). */
    operator_plugin_list_u8_t word = record->key.is_some ? record->key.val : record->value;
    size_t line_len = word.len + 1 + digits_len;
    uint8_t *line = malloc(line_len);
    if (line == NULL) {
        exports_weir_operator_operator_record_free(record);
        return fail(err, "out of memory");
    }
    memcpy(line, word.ptr, word.len);
    line[word.len] = ' ';
    memcpy(line + word.len + 1, digits, digits_len);

    weir_operator_output_record_t out = {
        .key = record->key,
        .value = {line, line_len},
        .timestamp = {.is_some = false},
    };
    weir_operator_output_emit(&out);
    free(line);
    exports_weir_operator_operator_record_free(record);
    return true;
}

bool exports_weir_operator_operator_process_batch(uint32_t input,
                                                  exports_weir_operator_operator_record_batch_t *batch,
                                                  operator_plugin_string_t *err) {
    (void)input;
    exports_weir_operator_operator_record_batch_free(batch);
    return fail(err, "this operator takes records one at a time (batch-input is false)");
}

bool exports_weir_operator_operator_on_timer(exports_weir_operator_operator_timer_t *timer,
                                             operator_plugin_string_t *err) {
    (void)err;
    exports_weir_operator_operator_timer_free(timer);
    return true;
}

bool exports_weir_operator_operator_close(operator_plugin_string_t *err) {
    (void)err;
    return true;
}

void exports_weir_operator_metadata_describe(exports_weir_operator_metadata_plugin_info_t *ret) {
    operator_plugin_string_dup(&ret->name, "count");
    operator_plugin_string_dup(&ret->version, "0.1.0-c");
    ret->states.len = 1;
    ret->states.ptr = malloc(sizeof(weir_operator_types_state_descriptor_t));
    operator_plugin_string_dup(&ret->states.ptr[0].name, "count");
    ret->states.ptr[0].kind = WEIR_OPERATOR_TYPES_STATE_KIND_VALUE;
    ret->states.ptr[0].schema_version = 1;
    ret->batch_input = false;
    weir_operator_state_declare_ttl(&COUNT, 30ULL * 24 * 60 * 60 * 1000,
                                    WEIR_OPERATOR_STATE_TTL_UPDATE_ON_CREATE_AND_WRITE,
                                    WEIR_OPERATOR_TYPES_TIME_DOMAIN_PROCESSING_TIME);
}
