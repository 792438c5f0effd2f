//! The client request decoder and the upstream reply scanner on arbitrary
//! bytes (checks in `kiln::fuzzing::frame_decoder`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    kiln::fuzzing::frame_decoder(data);
});
