//! The delta reader on arbitrary bytes: `apply::read_delta_head` on the bytes as a tar stream,
//! and `delta::parse` on them as manifest text. Either returns a value or an error, never
//! panics; a delta manifest that parses round-trips through its canonical text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = treeswap::ops::apply::read_delta_head(data);
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(d) = treeswap::core::delta::parse(text)
    {
        let again = treeswap::core::delta::parse(&d.to_toml()).expect("canonical text parses");
        assert_eq!(again, d, "delta manifest does not round-trip");
    }
});
