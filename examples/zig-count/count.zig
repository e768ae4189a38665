//! The word count's `count` operator in Zig: a running count per word (key),
//! emitted as "<word> <count>" on every update. Same state name, kind,
//! schema version and encoding (the count as JSON: its decimal digits) as
//! the Rust `count`, so a savepoint of either restores into the other.
//! Its count expires after 30 days without the word (a TTL, declared in
//! `describe`; a job file's `state_ttl` changes it).
//!
//! Zig has no WIT bindings generator, so this file is written against the
//! component model's canonical ABI directly (see README.md): core-module
//! imports and exports named after the `weir:operator` interfaces, values
//! flattened into core parameters, and results too large for one core
//! value returned through a pointer. `weir plugin componentize` embeds the
//! world and wraps the module as a component.

// ---------------------------------------------------------------- memory

/// Everything the host hands us (arguments of an export call, lists an
/// import returns) is allocated here through `cabi_realloc`, and freed all
/// at once when the export call that used it ends.
var arena: [4 << 20]u8 align(16) = undefined;
var used: usize = 0;

fn alignForward(at: usize, alignment: usize) usize {
    return (at + alignment - 1) & ~(alignment - 1);
}

fn cabiRealloc(old_ptr: ?[*]u8, old_size: usize, alignment: usize, new_size: usize) callconv(.c) [*]u8 {
    const start = alignForward(used, if (alignment == 0) 1 else alignment);
    if (start + new_size > arena.len) @trap();
    const ptr: [*]u8 = arena[start..].ptr;
    if (old_ptr) |old| {
        const keep = @min(old_size, new_size);
        for (0..keep) |i| ptr[i] = old[i];
    }
    used = start + new_size;
    return ptr;
}

fn resetArena() void {
    used = 0;
}

// ---------------------------------------------------------------- imports

/// `option<list<u8>>` as an import writes it into our memory.
const OptionList = extern struct {
    is_some: u8,
    ptr: [*]const u8,
    len: usize,
};

extern "weir:operator/state@0.1.0" fn @"value-get"(name_ptr: [*]const u8, name_len: usize, ret: *OptionList) void;
extern "weir:operator/state@0.1.0" fn @"value-set"(name_ptr: [*]const u8, name_len: usize, value_ptr: [*]const u8, value_len: usize) void;
/// `declare-ttl(state, millis, update, domain)`: enums cross as their case
/// index (`ttl-update`: 0 on-create-and-write; `time-domain`: 1 processing-time).
extern "weir:operator/state@0.1.0" fn @"declare-ttl"(name_ptr: [*]const u8, name_len: usize, millis: u64, update: u32, domain: u32) void;
/// `emit(record)`: the record flattened (key option, value, timestamp option).
extern "weir:operator/output@0.1.0" fn emit(
    key_is_some: u32,
    key_ptr: [*]const u8,
    key_len: usize,
    value_ptr: [*]const u8,
    value_len: usize,
    timestamp_is_some: u32,
    timestamp: i64,
) void;

// ---------------------------------------------------------------- exports

/// `result<_, string>` returned through a pointer.
const ResultVoidString = extern struct {
    is_err: u8,
    ptr: [*]const u8,
    len: usize,
};

var result_area: ResultVoidString = undefined;

fn ok() *const ResultVoidString {
    result_area = .{ .is_err = 0, .ptr = undefined, .len = 0 };
    return &result_area;
}

fn err(message: []const u8) *const ResultVoidString {
    result_area = .{ .is_err = 1, .ptr = message.ptr, .len = message.len };
    return &result_area;
}

const state_name = "count";

/// The stored count: JSON of an unsigned integer, i.e. its decimal digits.
fn parseCount(digits: []const u8) ?u64 {
    if (digits.len == 0) return null;
    var n: u64 = 0;
    for (digits) |c| {
        if (c < '0' or c > '9') return null;
        n = n * 10 + (c - '0');
    }
    return n;
}

fn formatCount(n: u64, out: *[20]u8) []const u8 {
    var reversed: [20]u8 = undefined;
    var len: usize = 0;
    var rest = n;
    while (true) {
        reversed[len] = @intCast('0' + rest % 10);
        len += 1;
        rest /= 10;
        if (rest == 0) break;
    }
    for (0..len) |i| out[i] = reversed[len - 1 - i];
    return out[0..len];
}

fn open(config_ptr: [*]const u8, config_len: usize) callconv(.c) *const ResultVoidString {
    _ = config_ptr;
    _ = config_len;
    defer resetArena();
    return ok();
}

fn process(
    input: u32,
    key_is_some: u32,
    key_ptr: [*]const u8,
    key_len: usize,
    value_ptr: [*]const u8,
    value_len: usize,
    timestamp_is_some: u32,
    timestamp: i64,
) callconv(.c) *const ResultVoidString {
    _ = input;
    _ = timestamp_is_some;
    _ = timestamp;
    defer resetArena();
    var stored: OptionList = undefined;
    @"value-get"(state_name.ptr, state_name.len, &stored);
    var count: u64 = 0;
    if (stored.is_some != 0) {
        count = parseCount(stored.ptr[0..stored.len]) orelse return err("state `count` does not hold a count");
    }
    count += 1;
    var digits_buffer: [20]u8 = undefined;
    const digits = formatCount(count, &digits_buffer);
    @"value-set"(state_name.ptr, state_name.len, digits.ptr, digits.len);

    // "<word> <count>", the word being the key (or the value if unkeyed).
    const word = if (key_is_some != 0) key_ptr[0..key_len] else value_ptr[0..value_len];
    const line_len = word.len + 1 + digits.len;
    const line = cabiRealloc(null, 0, 1, line_len);
    for (word, 0..) |c, i| line[i] = c;
    line[word.len] = ' ';
    for (digits, 0..) |c, i| line[word.len + 1 + i] = c;
    emit(key_is_some, key_ptr, key_len, line, line_len, 0, 0);
    return ok();
}

fn processBatch(input: u32, data_ptr: [*]const u8, data_len: usize, entries_ptr: [*]const u8, entries_len: usize) callconv(.c) *const ResultVoidString {
    _ = .{ input, data_ptr, data_len, entries_ptr, entries_len };
    defer resetArena();
    return err("this operator takes records one at a time (batch-input is false)");
}

fn onTimer(domain: u32, timestamp: i64, key_is_some: u32, key_ptr: [*]const u8, key_len: usize) callconv(.c) *const ResultVoidString {
    _ = .{ domain, timestamp, key_is_some, key_ptr, key_len };
    defer resetArena();
    return ok();
}

fn close() callconv(.c) *const ResultVoidString {
    defer resetArena();
    return ok();
}

/// `state-descriptor` in memory.
const StateDescriptor = extern struct {
    name_ptr: [*]const u8,
    name_len: usize,
    kind: u8, // 0 value, 1 list, 2 map
    schema_version: u32,
};

/// `plugin-info` in memory.
const PluginInfo = extern struct {
    name_ptr: [*]const u8,
    name_len: usize,
    version_ptr: [*]const u8,
    version_len: usize,
    states_ptr: [*]const StateDescriptor,
    states_len: usize,
    batch_input: u8,
};

const plugin_name = "count";
const plugin_version = "0.1.0-zig";
const states = [_]StateDescriptor{.{
    .name_ptr = state_name.ptr,
    .name_len = state_name.len,
    .kind = 0,
    .schema_version = 1,
}};
var info: PluginInfo = undefined;

fn describe() callconv(.c) *const PluginInfo {
    const count = "count";
    @"declare-ttl"(count.ptr, count.len, 30 * 24 * 60 * 60 * 1000, 0, 1);
    info = .{
        .name_ptr = plugin_name.ptr,
        .name_len = plugin_name.len,
        .version_ptr = plugin_version.ptr,
        .version_len = plugin_version.len,
        .states_ptr = &states,
        .states_len = states.len,
        .batch_input = 0,
    };
    return &info;
}

comptime {
    @export(&cabiRealloc, .{ .name = "cabi_realloc" });
    @export(&open, .{ .name = "weir:operator/operator@0.1.0#open" });
    @export(&process, .{ .name = "weir:operator/operator@0.1.0#process" });
    @export(&processBatch, .{ .name = "weir:operator/operator@0.1.0#process-batch" });
    @export(&onTimer, .{ .name = "weir:operator/operator@0.1.0#on-timer" });
    @export(&close, .{ .name = "weir:operator/operator@0.1.0#close" });
    @export(&describe, .{ .name = "weir:operator/metadata@0.1.0#describe" });
}
