//! Who may use a database: its owner package, the node, or a process
//! holding a capability the module issued on the owner's behalf.

use serde::Serialize;
use spindle_bus::{Bus, Capability};
use spindle_types::{Address, PackageId};

/// What an operation needs.
pub use spindle_abi::Access;

/// The parameters of a database capability, in a fixed order so that the
/// same right is always the same text.
#[derive(Serialize)]
struct Params<'a> {
    db: &'a str,
    package: String,
    access: &'static str,
}

/// The right to `access` the database `db` of `package`, issued by the
/// module at `module`.
pub fn capability(module: &Address, package: &PackageId, db: &str, access: Access) -> Capability {
    let params = Params {
        db,
        package: package.to_string(),
        access: access.name(),
    };
    Capability {
        issuer: module.clone(),
        params: serde_json::to_string(&params).expect("params serialise"),
    }
}

/// May `source` do what needs `need` to `package`'s database `db`?
pub fn allowed(
    bus: &Bus,
    module: &Address,
    source: &Address,
    package: &PackageId,
    db: &str,
    need: Access,
) -> bool {
    let own = &source.process.package;
    if own == package || own.is_system() {
        return true;
    }
    let holds = |a| bus.holds(&source.process, &capability(module, package, db, a));
    holds(Access::Write) || (need == Access::Read && holds(Access::Read))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Address {
        s.parse().unwrap()
    }

    #[test]
    fn owners_and_the_node_may_everything_others_what_they_were_given() {
        let bus = Bus::new("local");
        let kv = addr("local@kv:sys:spindle");
        let shop: PackageId = "shop:acme".parse().unwrap();
        let owner = addr("local@api:shop:acme");
        let other = addr("local@report:books:acme");
        let node = addr("local@cli-1:sys:spindle");
        for need in [Access::Read, Access::Write] {
            assert!(allowed(&bus, &kv, &owner, &shop, "orders", need));
            assert!(allowed(&bus, &kv, &node, &shop, "orders", need));
            assert!(!allowed(&bus, &kv, &other, &shop, "orders", need));
        }
        bus.grant(
            &other.process,
            [capability(&kv, &shop, "orders", Access::Read)],
        );
        assert!(allowed(&bus, &kv, &other, &shop, "orders", Access::Read));
        assert!(!allowed(&bus, &kv, &other, &shop, "orders", Access::Write));
        // Another database of the same package is another right.
        assert!(!allowed(&bus, &kv, &other, &shop, "users", Access::Read));
        bus.grant(
            &other.process,
            [capability(&kv, &shop, "orders", Access::Write)],
        );
        assert!(allowed(&bus, &kv, &other, &shop, "orders", Access::Write));
        // A right issued by another module is not this one's.
        let sql = addr("local@sqlite:sys:spindle");
        assert!(!allowed(&bus, &sql, &other, &shop, "orders", Access::Read));
    }

    #[test]
    fn the_same_right_is_always_the_same_text() {
        let kv = addr("local@kv:sys:spindle");
        let p: PackageId = "shop:acme".parse().unwrap();
        assert_eq!(
            capability(&kv, &p, "d", Access::Write).params,
            r#"{"db":"d","package":"shop:acme","access":"write"}"#
        );
    }
}
