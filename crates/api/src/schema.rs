//! JSON Schemas of the wire types whose serde impls are written by hand (feature `schema`).
//!
//! Every other wire type derives `schemars::JsonSchema` next to its serde derives, so its schema
//! follows the same `rename`, `flatten`, `untagged` and `default` attributes. These three accept
//! more than one JSON shape, and their schemas say so: what the server emits first, what it also
//! reads after.

use std::borrow::Cow;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};

use crate::{Autostop, Duration, Signal};

impl JsonSchema for Duration {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A Go duration: emitted as text (\"15s\", \"1m30s\"); integer nanoseconds are read too.",
            "oneOf": [
                {"type": "string", "example": "10s"},
                {"type": "integer", "minimum": 0}
            ]
        })
    }
}

impl JsonSchema for Signal {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "Signal".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        let names: Vec<&str> = Signal::ALL.iter().map(|s| s.as_str()).collect();
        let numbers: Vec<i32> = Signal::ALL.iter().map(|s| s.number()).collect();
        json_schema!({
            "description": "A signal: emitted by name; Linux numbers (fly-go's 9) and names without SIG are read too.",
            "oneOf": [
                {"type": "string", "enum": names},
                {"type": "integer", "enum": numbers}
            ]
        })
    }
}

impl JsonSchema for Autostop {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "Autostop".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "\"off\" or false, \"stop\" or true, \"suspend\"; emitted as false, true or \"suspend\" as fly-go does.",
            "oneOf": [
                {"type": "boolean"},
                {"type": "string", "enum": ["off", "stop", "suspend"]}
            ]
        })
    }
}

#[cfg(test)]
mod tests {
    use schemars::generate::SchemaSettings;
    use serde_json::{Value, json};

    use crate::{CreateMachineRequest, MachineEvent, SignalRequest};

    fn definitions<T: schemars::JsonSchema>() -> serde_json::Map<String, Value> {
        let mut generator = SchemaSettings::openapi3().into_generator();
        let _ = generator.subschema_for::<T>();
        generator.take_definitions(true)
    }

    #[test]
    fn schemas_follow_serde_names() {
        let defs = definitions::<MachineEvent>();
        let props = &defs["MachineEvent"]["properties"];
        assert!(props.get("type").is_some(), "rename = \"type\": {props}");
        assert!(props.get("kind").is_none());
        let request = &defs["MachineEventRequest"]["properties"];
        assert!(request.get("MonitorEvent").is_some(), "{request}");
        let create = definitions::<CreateMachineRequest>();
        let service = &create["MachineService"]["properties"];
        // Option<T> of a hand-written schema is wrapped: anyOf [T, null].
        let autostop = &service["autostop"]["anyOf"][0]["oneOf"];
        assert_eq!(autostop[0], json!({"type": "boolean"}), "{service}");
        assert_eq!(autostop[1]["enum"], json!(["off", "stop", "suspend"]));
        let check = &create["MachineServiceCheck"]["properties"];
        assert!(check.get("type").is_some(), "r#type is \"type\": {check}");
        assert_eq!(
            check["interval"]["anyOf"][0]["oneOf"][0]["type"], "string",
            "{check}"
        );
        let policy = &create["RestartPolicy"];
        assert!(policy.to_string().contains("on-failure"), "{policy}");
    }

    #[test]
    fn signals_by_name_or_number() {
        let defs = definitions::<SignalRequest>();
        let signal = &defs["SignalRequest"]["properties"]["signal"];
        assert_eq!(signal["oneOf"][1]["enum"][0], 6, "SIGABRT: {signal}");
        assert!(
            signal["oneOf"][0]["enum"]
                .as_array()
                .unwrap()
                .contains(&json!("SIGKILL"))
        );
    }
}
