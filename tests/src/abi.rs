//! Guest memory and ABI glue: reading and writing the module's linear memory,
//! allocating in it through its own allocator export, the proxy-wasm status codes and
//! the serialization of header maps ("pairs").
//!
//! Pairs serialization (proxy-wasm ABI 0.2.1, the Rust SDK's `utils::serialize_map`,
//! ngx_proxy_wasm_marshal and proxy-wasm-cpp-host `exportPairs` agree): a little-endian
//! `u32` count, then per pair a `u32` key length and a `u32` value length, then per pair
//! the key bytes, a NUL, the value bytes, a NUL.

use wasmtime::{AsContextMut, Caller, Extern, Memory};
use wasmtime::{Result, bail, format_err as anyhow};

/// A header map: lowercase names with their raw values, in order, repeats kept.
pub type Pairs = Vec<(String, Vec<u8>)>;

/// proxy-wasm `WasmResult` codes (proxy-wasm-cpp-host `WasmResult`; the Rust SDK's
/// `Status` is a subset).
pub mod status {
    pub const OK: u32 = 0;
    pub const NOT_FOUND: u32 = 1;
    pub const BAD_ARGUMENT: u32 = 2;
    pub const SERIALIZATION_FAILURE: u32 = 3;
    pub const INVALID_MEMORY_ACCESS: u32 = 6;
    pub const EMPTY: u32 = 7;
    pub const CAS_MISMATCH: u32 = 8;
    pub const INTERNAL_FAILURE: u32 = 10;
    pub const BROKEN_CONNECTION: u32 = 11;
    pub const UNIMPLEMENTED: u32 = 12;
}

/// The module's exported memory.
pub fn memory<T>(caller: &mut Caller<'_, T>) -> Result<Memory> {
    caller
        .get_export("memory")
        .and_then(Extern::into_memory)
        .ok_or_else(|| anyhow!("the module exports no memory"))
}

/// Copies `len` bytes at `ptr` out of guest memory; out of bounds is a trap.
pub fn read<T>(caller: &mut Caller<'_, T>, ptr: u32, len: u32) -> Result<Vec<u8>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let mem = memory(caller)?;
    let data = mem.data(&*caller);
    let (start, end) = (ptr as usize, ptr as usize + len as usize);
    match data.get(start..end) {
        Some(bytes) => Ok(bytes.to_vec()),
        None => bail!("invalid memory access: {len} bytes at {ptr}"),
    }
}

/// Reads a UTF-8 string (lossy: names are ASCII in practice).
pub fn read_string<T>(caller: &mut Caller<'_, T>, ptr: u32, len: u32) -> Result<String> {
    Ok(String::from_utf8_lossy(&read(caller, ptr, len)?).into_owned())
}

/// Writes `bytes` at `ptr`; out of bounds is a trap.
pub fn write<T>(caller: &mut Caller<'_, T>, ptr: u32, bytes: &[u8]) -> Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    let mem = memory(caller)?;
    let data = mem.data_mut(caller.as_context_mut());
    let (start, end) = (ptr as usize, ptr as usize + bytes.len());
    match data.get_mut(start..end) {
        Some(dst) => {
            dst.copy_from_slice(bytes);
            Ok(())
        }
        None => bail!("invalid memory access: {} bytes at {ptr}", bytes.len()),
    }
}

pub fn write_u32<T>(caller: &mut Caller<'_, T>, ptr: u32, value: u32) -> Result<()> {
    write(caller, ptr, &value.to_le_bytes())
}

pub fn write_u64<T>(caller: &mut Caller<'_, T>, ptr: u32, value: u64) -> Result<()> {
    write(caller, ptr, &value.to_le_bytes())
}

/// Allocates `size` bytes in guest memory with the module's allocator:
/// `proxy_on_memory_allocate` (the SDK's export), else `malloc`, as both hosts do.
pub fn allocate<T>(caller: &mut Caller<'_, T>, size: u32) -> Result<u32> {
    let func = caller
        .get_export("proxy_on_memory_allocate")
        .or_else(|| caller.get_export("malloc"))
        .and_then(Extern::into_func)
        .ok_or_else(|| anyhow!("the module exports neither proxy_on_memory_allocate nor malloc"))?;
    let func = func.typed::<u32, u32>(&*caller)?;
    let ptr = func.call(caller.as_context_mut(), size)?;
    if ptr == 0 && size != 0 {
        bail!("the module's allocator returned null for {size} bytes");
    }
    Ok(ptr)
}

/// Returns bytes to the module the way every `proxy_get_*` call does: allocated in guest
/// memory, the pointer written at `ptr_ptr` and the size at `size_ptr`. Empty data is
/// returned as a null pointer and size 0 (the SDK maps it to `None`/empty).
pub fn return_bytes<T>(
    caller: &mut Caller<'_, T>,
    data: &[u8],
    ptr_ptr: u32,
    size_ptr: u32,
) -> Result<()> {
    if data.is_empty() {
        write_u32(caller, ptr_ptr, 0)?;
        return write_u32(caller, size_ptr, 0);
    }
    let ptr = allocate(caller, data.len() as u32)?;
    write(caller, ptr, data)?;
    write_u32(caller, ptr_ptr, ptr)?;
    write_u32(caller, size_ptr, data.len() as u32)
}

/// Serializes a header map (see the module doc).
pub fn serialize_pairs(pairs: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut size = 4;
    for (k, v) in pairs {
        size += 8 + k.len() + v.len() + 2;
    }
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// Parses a header map; `None` when malformed. An empty buffer is an empty map.
pub fn deserialize_pairs(bytes: &[u8]) -> Option<Pairs> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
    };
    let count = u32_at(0)? as usize;
    let mut sizes = Vec::with_capacity(count.min(1024));
    for i in 0..count {
        sizes.push((u32_at(4 + i * 8)? as usize, u32_at(8 + i * 8)? as usize));
    }
    let mut at = 4 + count * 8;
    let mut pairs = Vec::with_capacity(count.min(1024));
    for (klen, vlen) in sizes {
        let key = bytes.get(at..at + klen)?;
        at += klen + 1;
        let value = bytes.get(at..at + vlen)?;
        at += vlen + 1;
        pairs.push((String::from_utf8_lossy(key).into_owned(), value.to_vec()));
    }
    Some(pairs)
}

/// The first value of `name` (case-insensitive) in a header map.
pub fn get<'a>(pairs: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    pairs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

/// The `content-length` of a header map, when it has a valid one.
pub fn content_length(pairs: &[(String, Vec<u8>)]) -> Option<u64> {
    get(pairs, "content-length").and_then(|v| std::str::from_utf8(v).ok()?.trim().parse().ok())
}

/// Replaces every value of `name` by one (appended where the first one was).
pub fn replace(pairs: &mut Pairs, name: &str, value: Vec<u8>) {
    let name = name.to_ascii_lowercase();
    match pairs.iter().position(|(k, _)| *k == name) {
        Some(first) => {
            pairs[first].1 = value;
            let mut i = 0;
            pairs.retain(|(k, _)| {
                let keep = *k != name || i == first;
                i += 1;
                keep
            });
        }
        None => pairs.push((name, value)),
    }
}

/// Removes every value of `name`.
pub fn remove(pairs: &mut Pairs, name: &str) {
    pairs.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_round_trip_with_repeats_and_binary() {
        let pairs: Pairs = vec![
            (":status".into(), b"200".to_vec()),
            ("set-cookie".into(), b"a=1".to_vec()),
            ("set-cookie".into(), vec![0xff, 0x00, 0x01]),
            ("empty".into(), Vec::new()),
        ];
        let bytes = serialize_pairs(&pairs);
        assert_eq!(&bytes[..4], &4u32.to_le_bytes());
        assert_eq!(deserialize_pairs(&bytes), Some(pairs));
        assert_eq!(deserialize_pairs(&bytes[..bytes.len() - 3]), None);
        assert_eq!(deserialize_pairs(&[]), Some(Vec::new()));
    }

    #[test]
    fn replace_keeps_one_value_where_the_first_was() {
        let mut pairs: Pairs = vec![
            ("a".into(), b"1".to_vec()),
            ("b".into(), b"2".to_vec()),
            ("a".into(), b"3".to_vec()),
        ];
        replace(&mut pairs, "A", b"9".to_vec());
        assert_eq!(
            pairs,
            vec![("a".into(), b"9".to_vec()), ("b".into(), b"2".to_vec())]
        );
        remove(&mut pairs, "b");
        assert_eq!(pairs, vec![("a".into(), b"9".to_vec())]);
    }
}
