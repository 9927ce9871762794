//! Node-to-node frames from a peer: the length prefix and the frame
//! after it. A frame that decodes encodes back to the same bytes.
#![no_main]
use spindle_net::wire::{self, Frame};
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some((prefix, rest)) = data.split_first_chunk::<4>() {
        let _ = wire::frame_len(*prefix);
        if let Ok(Frame::Message { header, body, blob }) = wire::decode(rest) {
            let mut again = vec![];
            if wire::encode_message(&mut again, &header, body, blob).is_ok() {
                assert_eq!(wire::decode(&again[4..]).ok(), wire::decode(rest).ok());
            }
        }
    }
});
