//! Feeds arbitrary text to the configuration parser and validator: a broken file is an error
//! naming what is wrong, never a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use stagingprop::config::Config;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(e) = Config::from_toml_str(text, "fuzz.toml") {
            let _ = e.to_string();
        }
    }
});
