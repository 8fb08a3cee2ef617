//! The invented world: clinics, their devices (AE titles), patients
//! registered at clinics, studies and series.

use crate::people::{Date, Person};

/// A member clinic of the consortium.
#[derive(Debug)]
pub(crate) struct Clinic {
    /// Clinic id, also the Issuer of Patient ID for its local patient IDs.
    pub(crate) id: &'static str,
    /// Institution Name (Chinese).
    pub(crate) name: &'static str,
    /// Prefix of local Patient IDs and accession numbers.
    pub(crate) prefix: &'static str,
}

pub(crate) const XINZHEN: Clinic = Clinic {
    id: "xinzhen",
    name: "新镇乡卫生院",
    prefix: "XZ",
};
pub(crate) const BAISHUI: Clinic = Clinic {
    id: "baishui",
    name: "白水镇卫生院",
    prefix: "BS",
};
pub(crate) const COUNTY: Clinic = Clinic {
    id: "county",
    name: "县医院",
    prefix: "XY",
};

/// Specific Character Set of a sending device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Charset {
    /// `ISO_IR 192` (UTF-8).
    Utf8,
    /// `GB18030`.
    Gb18030,
}

impl Charset {
    pub(crate) fn term(self) -> &'static str {
        match self {
            Charset::Utf8 => "ISO_IR 192",
            Charset::Gb18030 => "GB18030",
        }
    }
}

/// A modality or workstation that sends to the center.
#[derive(Debug)]
pub(crate) struct Device {
    pub(crate) ae: &'static str,
    pub(crate) clinic: &'static Clinic,
    pub(crate) station: &'static str,
    pub(crate) manufacturer: &'static str,
    pub(crate) model: &'static str,
    pub(crate) serial: &'static str,
    pub(crate) charset: Charset,
}

pub(crate) const XINZHEN_CT: Device = Device {
    ae: "XINZHEN_CT",
    clinic: &XINZHEN,
    station: "XZCT01",
    manufacturer: "Synthetic Imaging Co",
    model: "SynthCT 16",
    serial: "SCT16-0417",
    charset: Charset::Utf8,
};
pub(crate) const XINZHEN_US: Device = Device {
    ae: "XINZHEN_US",
    clinic: &XINZHEN,
    station: "XZUS01",
    manufacturer: "Synthetic Imaging Co",
    model: "SynthEcho 5",
    serial: "SE5-2291",
    charset: Charset::Utf8,
};
pub(crate) const BAISHUI_DR: Device = Device {
    ae: "BAISHUI_DR",
    clinic: &BAISHUI,
    station: "BSDR01",
    manufacturer: "Synthetic Imaging Co",
    model: "SynthDR 43",
    serial: "SDR43-0093",
    // an older machine that still speaks GB18030
    charset: Charset::Gb18030,
};
pub(crate) const BAISHUI_ECG: Device = Device {
    ae: "BAISHUI_ECG",
    clinic: &BAISHUI,
    station: "BSECG1",
    manufacturer: "Synthetic Cardio Co",
    model: "SynthECG 12",
    serial: "SEC12-7781",
    charset: Charset::Utf8,
};
pub(crate) const COUNTYWS1: Device = Device {
    ae: "COUNTYWS1",
    clinic: &COUNTY,
    station: "COUNTYWS1",
    manufacturer: "Synthetic Imaging Co",
    model: "SynthMR 1.5T / SynthWS",
    serial: "SMR15-0008",
    charset: Charset::Utf8,
};

/// A person registered at a clinic under the clinic's local Patient ID.
#[derive(Clone, Debug)]
pub(crate) struct Patient {
    pub(crate) person: Person,
    pub(crate) clinic: &'static Clinic,
    pub(crate) id: String,
}

/// One study as the sending device reports it.
#[derive(Clone, Debug)]
pub(crate) struct Study {
    pub(crate) uid: String,
    pub(crate) patient: Patient,
    pub(crate) device: &'static Device,
    pub(crate) charset: Charset,
    pub(crate) date: Date,
    /// Seconds after midnight.
    pub(crate) time: u32,
    pub(crate) accession: String,
    pub(crate) id: String,
    pub(crate) description: String,
    /// Referring physician (Person Name with ideographic group).
    pub(crate) referring: String,
}

/// One series of a study.
#[derive(Clone, Debug)]
pub(crate) struct Series {
    pub(crate) uid: String,
    pub(crate) number: u32,
    pub(crate) modality: &'static str,
    pub(crate) description: String,
    pub(crate) body_part: &'static str,
    /// Seconds after midnight.
    pub(crate) time: u32,
    pub(crate) frame_of_reference: String,
}

/// `HHMMSS` from seconds after midnight.
pub(crate) fn tm(secs: u32) -> String {
    let secs = secs % 86_400;
    format!("{:02}{:02}{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}
