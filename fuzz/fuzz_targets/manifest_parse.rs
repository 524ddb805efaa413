//! `treeswap::core::manifest::parse` on arbitrary text: it returns a manifest or an error, never
//! panics; a manifest it accepts is valid and round-trips through its canonical text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(m) = treeswap::core::manifest::parse(text) {
        let again = treeswap::core::manifest::parse(&m.to_toml()).expect("canonical text parses");
        assert_eq!(again, m, "manifest does not round-trip");
    }
});
