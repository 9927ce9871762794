//! Words for a fault of the node's own code, caught on a process's behalf.

/// A panic's message, as far as it has one.
pub fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

#[cfg(test)]
mod tests {
    use super::*;

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
