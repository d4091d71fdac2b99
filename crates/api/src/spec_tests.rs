//! Every property of the spec's schemas for the types of this crate survives a round trip, under
//! the spec's name. The fixture is generated from `machines-openapi3.json`: one object per schema
//! with every property set (enums at a valid value, nested configs minimal). `ErrorResponse.details`
//! is deprecated and left out: aloft ignores it.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::*;

const SHAPES: &str = include_str!("../tests/fixtures/spec_shapes.json");

fn round_trip<T: Serialize + DeserializeOwned>(shapes: &Value, name: &str) {
    let input = &shapes[name];
    assert!(input.is_object(), "fixture has {name}");
    let parsed: T = serde_json::from_value(input.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
    let output = serde_json::to_value(&parsed).unwrap();
    assert_eq!(&output, input, "{name} changes on a round trip");
}

#[test]
fn every_spec_property_round_trips() {
    let shapes: Value = serde_json::from_str(SHAPES).unwrap();
    round_trip::<Machine>(&shapes, "Machine");
    round_trip::<CreateMachineRequest>(&shapes, "CreateMachineRequest");
    round_trip::<UpdateMachineRequest>(&shapes, "UpdateMachineRequest");
    round_trip::<StopRequest>(&shapes, "StopRequest");
    round_trip::<SignalRequest>(&shapes, "SignalRequest");
    round_trip::<Lease>(&shapes, "Lease");
    round_trip::<CreateLeaseRequest>(&shapes, "CreateLeaseRequest");
    round_trip::<MachineEvent>(&shapes, "MachineEvent");
    round_trip::<MachineVersion>(&shapes, "MachineVersion");
    round_trip::<App>(&shapes, "App");
    round_trip::<AppOrganizationInfo>(&shapes, "AppOrganizationInfo");
    round_trip::<CreateAppRequest>(&shapes, "CreateAppRequest");
    round_trip::<ListAppsResponse>(&shapes, "ListAppsResponse");
    round_trip::<ProcessStat>(&shapes, "ProcessStat");
    round_trip::<ListenSocket>(&shapes, "ListenSocket");
    round_trip::<ExecRequest>(&shapes, "ExecRequest");
    round_trip::<ExecResponse>(&shapes, "ExecResponse");
    round_trip::<WaitResponse>(&shapes, "WaitResponse");
    round_trip::<ErrorResponse>(&shapes, "ErrorResponse");
    round_trip::<ImageRef>(&shapes, "ImageRef");
    round_trip::<CheckStatus>(&shapes, "CheckStatus");
    round_trip::<UpdateMetadataRequest>(&shapes, "UpdateMetadataRequest");
    round_trip::<UpsertMetadataKeyRequest>(&shapes, "UpsertMetadataKeyRequest");
    round_trip::<MetadataValueResponse>(&shapes, "MetadataValueResponse");
    round_trip::<TokenResponse>(&shapes, "TokenResponse");
    round_trip::<CreateDeployTokenRequest>(&shapes, "CreateDeployTokenRequest");
    round_trip::<Volume>(&shapes, "Volume");
    round_trip::<CreateVolumeRequest>(&shapes, "CreateVolumeRequest");
    round_trip::<UpdateVolumeRequest>(&shapes, "UpdateVolumeRequest");
    round_trip::<ExtendVolumeRequest>(&shapes, "ExtendVolumeRequest");
    round_trip::<ExtendVolumeResponse>(&shapes, "ExtendVolumeResponse");
    assert_eq!(
        shapes.as_object().unwrap().len(),
        31,
        "every fixture entry is checked"
    );
}
