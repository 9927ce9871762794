//! Words for a fault — of the node's own code, caught on a process's
//! behalf, or of what a process handed the node — kept to a bounded size.

/// A panic's message, as far as it has one.
pub fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// `text`'s first `max` bytes (at a character boundary), with `…` if it
/// was cut: what a report keeps of text it did not choose.
pub fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_keeps_whole_characters_and_says_it_cut() {
        assert_eq!(cut("short", 16), "short");
        assert_eq!(cut("abcdef", 3), "abc…");
        // 'é' is two bytes: a cut inside it keeps none of it.
        assert_eq!(cut("aé", 2), "a…");
    }

    #[test]
    fn panic_messages() {
        let s: Box<dyn std::any::Any + Send> = Box::new("text");
        assert_eq!(panic_text(&*s), "text");
        let s: Box<dyn std::any::Any + Send> = Box::new(String::from("owned"));
        assert_eq!(panic_text(&*s), "owned");
        let s: Box<dyn std::any::Any + Send> = Box::new(5u8);
        assert_eq!(panic_text(&*s), "a panic without a message");
    }
}
