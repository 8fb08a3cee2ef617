//! dicom-rs's own association implementation (dicom-ul `ClientAssociation`)
//! as the SCU: negotiation, a C-STORE whose dataset is split into PDUs by
//! dicom-ul's P-DATA writer, and a graceful release.

mod common;

use std::io::Write;

use common::scu::{CT_IMAGE_STORAGE, EXPLICIT_LE, VERIFICATION};
use common::{Gateway, GatewaySpec};
use dicom_ul::association::client::ClientAssociationOptions;
use dicom_ul::pdu::{PDataValue, PDataValueType, Pdu};

fn status_of(pdu: Pdu) -> u16 {
    let Pdu::PData { data } = pdu else {
        panic!("expected P-DATA, got {pdu:?}")
    };
    let command: Vec<u8> = data.into_iter().flat_map(|v| v.data).collect();
    let mut rest = &command[..];
    while rest.len() >= 8 {
        let element = u16::from_le_bytes([rest[2], rest[3]]);
        let len = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
        if element == 0x0900 {
            return u16::from_le_bytes([rest[8], rest[9]]);
        }
        rest = &rest[8 + len..];
    }
    panic!("no status")
}

#[test]
fn dicom_ul_client_echoes_and_stores() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(dir.path(), &GatewaySpec::default());
    let mut assoc = ClientAssociationOptions::new()
        .calling_ae_title("XINZHEN_CT")
        .called_ae_title(common::AE)
        .with_presentation_context(VERIFICATION, vec![common::scu::IMPLICIT_LE])
        .with_presentation_context(
            CT_IMAGE_STORAGE,
            vec!["1.2.840.10008.1.2.4.70", EXPLICIT_LE],
        )
        .max_pdu_length(16_384)
        .establish(("127.0.0.1", gw.port))
        .expect("association accepted");
    let contexts = assoc.presentation_contexts().to_vec();
    let echo_ctx = contexts
        .iter()
        .find(|c| c.abstract_syntax == VERIFICATION)
        .unwrap()
        .id;
    let ct = contexts
        .iter()
        .find(|c| c.abstract_syntax == CT_IMAGE_STORAGE)
        .unwrap();
    // The first proposed syntax we support wins: JPEG Lossless would be kept as is.
    assert_eq!(ct.transfer_syntax, "1.2.840.10008.1.2.4.70");
    assert_eq!(assoc.acceptor_max_pdu_length(), 262_144);

    assoc
        .send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: echo_ctx,
                value_type: PDataValueType::Command,
                is_last: true,
                data: common::scu::echo_rq(1),
            }],
        })
        .unwrap();
    assert_eq!(status_of(assoc.receive().unwrap()), 0x0000);
    assoc.release().unwrap();

    // Explicit VR LE only, so the synthetic dataset matches its syntax.
    let mut assoc = ClientAssociationOptions::new()
        .calling_ae_title("XINZHEN_CT")
        .called_ae_title(common::AE)
        .with_presentation_context(CT_IMAGE_STORAGE, vec![EXPLICIT_LE])
        .establish(("127.0.0.1", gw.port))
        .unwrap();
    let ctx = assoc.presentation_contexts()[0].id;
    let dataset = common::scu::ct_dataset("2.25.4242", "2.25.42", 200_000);
    assoc
        .send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: ctx,
                value_type: PDataValueType::Command,
                is_last: true,
                data: common::scu::store_rq(2, CT_IMAGE_STORAGE, "2.25.4242"),
            }],
        })
        .unwrap();
    {
        // dicom-ul splits the dataset into PDUs of the negotiated size.
        let mut writer = assoc.send_pdata(ctx);
        writer.write_all(&dataset).unwrap();
        writer.finish().unwrap();
    }
    assert_eq!(status_of(assoc.receive().unwrap()), 0x0000);
    assoc.release().unwrap();

    let (blob, offset) = gw.blob_of("2.25.4242").expect("indexed");
    assert!(std::fs::read(blob).unwrap()[offset..] == dataset[..]);
}
