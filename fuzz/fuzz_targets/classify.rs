//! Command classification (writes and their keys, blocking, admin, relay,
//! refused) on whatever commands arbitrary bytes parse to (checks in
//! `kiln::fuzzing::classify`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    kiln::fuzzing::classify(data);
});
