//! Builders for each object kind (IOD): the shared Patient / Study /
//! Series / Equipment / SOP Common modules, then CT, MR, DX, CR, US,
//! 12-lead ECG and Encapsulated PDF specifics.

use dicom_core::{PrimitiveValue, VR};
use dicom_dictionary_std::{tags, uids};

use crate::ds::{Ds, Ts, code};
use crate::model::{Series, Study, tm};
use crate::pixels::{self, MrWeighting, Region};
use crate::rle::{self, FrameSamples};
use crate::rng::Rng;
use crate::{ecg, pdf};

/// Issuer of Patient ID for resident ID numbers in Other Patient IDs.
pub(crate) const RESIDENT_ID_ISSUER: &str = "CN-RID";

/// Software Versions of the synthetic devices.
const SOFTWARE: &str = concat!("sample-dicom ", env!("CARGO_PKG_VERSION"));

/// The identity of one instance being built.
pub(crate) struct Inst<'a> {
    pub(crate) study: &'a Study,
    pub(crate) series: &'a Series,
    pub(crate) sop_class: &'static str,
    pub(crate) sop_uid: String,
    pub(crate) number: u32,
    /// Content time, seconds after midnight.
    pub(crate) time: u32,
}

/// Patient, General Study, Patient Study, General Series, General
/// Equipment and SOP Common modules.
pub(crate) fn common(inst: &Inst<'_>) -> Ds {
    let st = inst.study;
    let se = inst.series;
    let p = &st.patient;
    let dev = st.device;
    let mut d = Ds::new();
    d.s(tags::SPECIFIC_CHARACTER_SET, VR::CS, st.charset.term())
        .s(tags::INSTANCE_CREATION_DATE, VR::DA, st.date.da())
        .s(tags::INSTANCE_CREATION_TIME, VR::TM, tm(inst.time + 30))
        .s(tags::SOP_CLASS_UID, VR::UI, inst.sop_class)
        .s(tags::SOP_INSTANCE_UID, VR::UI, &inst.sop_uid)
        .s(tags::STUDY_DATE, VR::DA, st.date.da())
        .s(tags::SERIES_DATE, VR::DA, st.date.da())
        .s(tags::STUDY_TIME, VR::TM, tm(st.time))
        .s(tags::SERIES_TIME, VR::TM, tm(se.time))
        .s(tags::ACCESSION_NUMBER, VR::SH, &st.accession)
        .s(tags::MODALITY, VR::CS, se.modality)
        .s(tags::MANUFACTURER, VR::LO, dev.manufacturer)
        .s(tags::INSTITUTION_NAME, VR::LO, dev.clinic.name)
        .s(tags::REFERRING_PHYSICIAN_NAME, VR::PN, &st.referring)
        .s(tags::STATION_NAME, VR::SH, dev.station)
        .s(tags::STUDY_DESCRIPTION, VR::LO, &st.description)
        .s(tags::SERIES_DESCRIPTION, VR::LO, &se.description)
        .s(tags::MANUFACTURER_MODEL_NAME, VR::LO, dev.model)
        .s(tags::PATIENT_NAME, VR::PN, p.person.pn())
        .s(tags::PATIENT_ID, VR::LO, &p.id)
        .s(tags::ISSUER_OF_PATIENT_ID, VR::LO, p.clinic.id)
        .s(tags::PATIENT_BIRTH_DATE, VR::DA, p.person.birth.da())
        .s(tags::PATIENT_SEX, VR::CS, p.person.sex.code());
    let mut other = Ds::new();
    other
        .s(tags::PATIENT_ID, VR::LO, &p.person.resident_id)
        .s(tags::ISSUER_OF_PATIENT_ID, VR::LO, RESIDENT_ID_ISSUER)
        .s(tags::TYPE_OF_PATIENT_ID, VR::CS, "TEXT");
    d.seq(tags::OTHER_PATIENT_I_DS_SEQUENCE, vec![other])
        .s(
            tags::PATIENT_AGE,
            VR::AS,
            format!("{:03}Y", p.person.birth.age_on(st.date).min(999)),
        )
        .s(tags::DEVICE_SERIAL_NUMBER, VR::LO, dev.serial)
        .s(tags::SOFTWARE_VERSIONS, VR::LO, SOFTWARE)
        .s(tags::STUDY_INSTANCE_UID, VR::UI, &st.uid)
        .s(tags::SERIES_INSTANCE_UID, VR::UI, &se.uid)
        .s(tags::STUDY_ID, VR::SH, &st.id)
        .s(tags::SERIES_NUMBER, VR::IS, se.number.to_string())
        .s(tags::INSTANCE_NUMBER, VR::IS, inst.number.to_string());
    if !se.body_part.is_empty() {
        d.s(tags::BODY_PART_EXAMINED, VR::CS, se.body_part);
    }
    d
}

/// General Image content date/time and acquisition date/time.
pub(crate) fn image_times(d: &mut Ds, inst: &Inst<'_>) {
    let date = inst.study.date.da();
    d.s(tags::CONTENT_DATE, VR::DA, &date)
        .s(tags::CONTENT_TIME, VR::TM, tm(inst.time))
        .s(tags::ACQUISITION_DATE, VR::DA, &date)
        .s(tags::ACQUISITION_TIME, VR::TM, tm(inst.time));
}

/// Image Pixel module attributes (without Pixel Data).
#[allow(clippy::too_many_arguments)]
pub(crate) fn image_pixel(
    d: &mut Ds,
    rows: usize,
    cols: usize,
    samples: u16,
    photometric: &str,
    bits_allocated: u16,
    bits_stored: u16,
    signed: bool,
) {
    d.us(tags::SAMPLES_PER_PIXEL, samples)
        .s(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, photometric)
        .us(tags::ROWS, rows as u16)
        .us(tags::COLUMNS, cols as u16)
        .us(tags::BITS_ALLOCATED, bits_allocated)
        .us(tags::BITS_STORED, bits_stored)
        .us(tags::HIGH_BIT, bits_stored - 1)
        .us(tags::PIXEL_REPRESENTATION, u16::from(signed));
    if samples > 1 {
        d.us(tags::PLANAR_CONFIGURATION, 0);
    }
}

/// 16-bit grayscale frames as native OW or RLE fragments.
pub(crate) fn put_pixels_u16(d: &mut Ds, frames: Vec<Vec<u16>>, rows: usize, cols: usize, ts: Ts) {
    match ts {
        Ts::Rle => {
            let frags = frames
                .iter()
                .map(|f| rle::encode_frame(&FrameSamples::U16(f), rows, cols, 1))
                .collect();
            d.fragments(frags);
        }
        Ts::JpegBaseline => unreachable!("JPEG Baseline is 8-bit only"),
        _ => {
            let all: Vec<u16> = frames.concat();
            d.raw(tags::PIXEL_DATA, VR::OW, PrimitiveValue::U16(all.into()));
        }
    }
}

/// 8-bit frames (interleaved samples) as native OB, RLE or JPEG Baseline.
/// Returns the compression ratio for lossy output.
fn put_pixels_u8(
    d: &mut Ds,
    frames: Vec<Vec<u8>>,
    rows: usize,
    cols: usize,
    components: usize,
    ts: Ts,
) -> Option<f64> {
    match ts {
        Ts::Rle => {
            let frags = frames
                .iter()
                .map(|f| rle::encode_frame(&FrameSamples::U8(f), rows, cols, components))
                .collect();
            d.fragments(frags);
            None
        }
        Ts::JpegBaseline => {
            let raw: usize = frames.iter().map(Vec::len).sum();
            let frags: Vec<Vec<u8>> = frames
                .iter()
                .map(|f| jpeg(f, rows, cols, components))
                .collect();
            let compressed: usize = frags.iter().map(Vec::len).sum();
            d.fragments(frags);
            Some(raw as f64 / compressed as f64)
        }
        _ => {
            let all: Vec<u8> = frames.concat();
            d.raw(tags::PIXEL_DATA, VR::OB, PrimitiveValue::from(all));
            None
        }
    }
}

/// One JPEG Baseline (process 1) frame; colour is 4:2:2 subsampled YCbCr,
/// which DICOM calls YBR_FULL_422.
fn jpeg(frame: &[u8], rows: usize, cols: usize, components: usize) -> Vec<u8> {
    use jpeg_encoder::{ColorType, Encoder, SamplingFactor};
    let mut buf = Vec::new();
    let mut enc = Encoder::new(&mut buf, 88);
    let color = if components == 3 {
        enc.set_sampling_factor(SamplingFactor::F_2_1);
        ColorType::Rgb
    } else {
        ColorType::Luma
    };
    enc.encode(frame, cols as u16, rows as u16, color)
        .expect("in-memory JPEG encoding of a well-sized frame");
    buf
}

/// Mark lossy compression (General Image module).
pub(crate) fn lossy(d: &mut Ds, ratio: Option<f64>) {
    match ratio {
        Some(r) => {
            d.s(tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "01")
                .dsv(
                    tags::LOSSY_IMAGE_COMPRESSION_RATIO,
                    &[(r * 10.0).round() / 10.0],
                )
                .s(tags::LOSSY_IMAGE_COMPRESSION_METHOD, VR::CS, "ISO_10918_1");
        }
        None => {
            d.s(tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "00");
        }
    }
}

/// Geometry of one CT or MR slice.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Slice {
    pub(crate) n: usize,
    pub(crate) spacing: f64,
    pub(crate) thickness: f64,
    pub(crate) z: f64,
}

fn image_plane(d: &mut Ds, s: Slice, table_y: f64) {
    let origin = -(s.n as f64 - 1.0) / 2.0 * s.spacing;
    d.dsv(tags::PIXEL_SPACING, &[s.spacing, s.spacing])
        .dsv(
            tags::IMAGE_ORIENTATION_PATIENT,
            &[1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
        )
        .dsv(
            tags::IMAGE_POSITION_PATIENT,
            &[origin, origin + table_y, s.z],
        )
        .dsv(tags::SLICE_THICKNESS, &[s.thickness])
        .dsv(tags::SLICE_LOCATION, &[s.z]);
}

/// CT Image Storage: 12-bit unsigned, HU = value - 1024, two VOI windows.
pub(crate) fn ct(inst: &Inst<'_>, s: Slice, region: Region, ts: Ts, rng: &mut Rng) -> Ds {
    let mut d = common(inst);
    image_times(&mut d, inst);
    d.m(tags::IMAGE_TYPE, VR::CS, &["ORIGINAL", "PRIMARY", "AXIAL"])
        .s(
            tags::FRAME_OF_REFERENCE_UID,
            VR::UI,
            &inst.series.frame_of_reference,
        )
        .s(tags::POSITION_REFERENCE_INDICATOR, VR::LO, "")
        .s(tags::PATIENT_POSITION, VR::CS, "HFS")
        .s(tags::SCAN_OPTIONS, VR::CS, "HELICAL")
        .dsv(tags::KVP, &[120.0])
        .s(tags::ACQUISITION_NUMBER, VR::IS, "1")
        .dsv(tags::DATA_COLLECTION_DIAMETER, &[500.0])
        .dsv(tags::RECONSTRUCTION_DIAMETER, &[s.spacing * s.n as f64])
        .dsv(tags::DISTANCE_SOURCE_TO_DETECTOR, &[949.0])
        .dsv(tags::DISTANCE_SOURCE_TO_PATIENT, &[541.0])
        .dsv(tags::GANTRY_DETECTOR_TILT, &[0.0])
        .dsv(tags::TABLE_HEIGHT, &[165.0])
        .s(tags::ROTATION_DIRECTION, VR::CS, "CW")
        .s(tags::EXPOSURE_TIME, VR::IS, "600")
        .s(tags::X_RAY_TUBE_CURRENT, VR::IS, "220")
        .s(tags::EXPOSURE, VR::IS, "132")
        .s(
            tags::CONVOLUTION_KERNEL,
            VR::SH,
            if region == Region::Head {
                "H40s"
            } else {
                "B30f"
            },
        )
        .dsv(tags::RESCALE_INTERCEPT, &[-1024.0])
        .dsv(tags::RESCALE_SLOPE, &[1.0])
        .s(tags::RESCALE_TYPE, VR::LO, "HU");
    let (wc, ww, expl): ([f64; 2], [f64; 2], [&str; 2]) = match region {
        Region::Head => ([40.0, 600.0], [80.0, 2800.0], ["BRAIN", "BONE"]),
        Region::Chest => ([40.0, -600.0], [400.0, 1500.0], ["MEDIASTINUM", "LUNG"]),
        Region::Abdomen => ([40.0, 350.0], [400.0, 1500.0], ["SOFT TISSUE", "BONE"]),
    };
    d.dsv(tags::WINDOW_CENTER, &wc)
        .dsv(tags::WINDOW_WIDTH, &ww)
        .m(tags::WINDOW_CENTER_WIDTH_EXPLANATION, VR::LO, &expl);
    image_plane(&mut d, s, 0.0);
    image_pixel(&mut d, s.n, s.n, 1, "MONOCHROME2", 16, 12, false);
    lossy(&mut d, None);
    let px = pixels::ct_slice(s.n, s.spacing, s.z, region, rng);
    put_pixels_u16(&mut d, vec![px], s.n, s.n, ts);
    d
}

/// MR Image Storage: an axial brain slice of a T1 SE, T2 TSE or FLAIR
/// series, 12-bit unsigned.
pub(crate) fn mr(inst: &Inst<'_>, s: Slice, weighting: MrWeighting, ts: Ts, rng: &mut Rng) -> Ds {
    struct Protocol {
        scanning: &'static [&'static str],
        variant: &'static [&'static str],
        name: &'static str,
        tr: f64,
        te: f64,
        ti: Option<f64>,
        etl: u32,
        flip: f64,
        window: [f64; 2],
    }
    let p = match weighting {
        MrWeighting::T1 => Protocol {
            scanning: &["SE"],
            variant: &["SP"],
            name: "*se2d1",
            tr: 500.0,
            te: 12.0,
            ti: None,
            etl: 1,
            flip: 90.0,
            window: [650.0, 1300.0],
        },
        MrWeighting::T2 => Protocol {
            scanning: &["SE"],
            variant: &["SK", "SP"],
            name: "*tse2d1_16",
            tr: 4000.0,
            te: 98.0,
            ti: None,
            etl: 16,
            flip: 150.0,
            window: [700.0, 1400.0],
        },
        MrWeighting::Flair => Protocol {
            scanning: &["SE", "IR"],
            variant: &["SK", "SP", "MP"],
            name: "*tir2d1_16",
            tr: 9000.0,
            te: 90.0,
            ti: Some(2500.0),
            etl: 16,
            flip: 150.0,
            window: [550.0, 1100.0],
        },
    };
    let mut d = common(inst);
    image_times(&mut d, inst);
    let n = s.n as u16;
    d.m(tags::IMAGE_TYPE, VR::CS, &["ORIGINAL", "PRIMARY", "OTHER"])
        .s(
            tags::FRAME_OF_REFERENCE_UID,
            VR::UI,
            &inst.series.frame_of_reference,
        )
        .s(tags::POSITION_REFERENCE_INDICATOR, VR::LO, "")
        .s(tags::PATIENT_POSITION, VR::CS, "HFS")
        .m(tags::SCANNING_SEQUENCE, VR::CS, p.scanning)
        .m(tags::SEQUENCE_VARIANT, VR::CS, p.variant)
        .s(tags::SCAN_OPTIONS, VR::CS, "")
        .s(tags::MR_ACQUISITION_TYPE, VR::CS, "2D")
        .s(tags::SEQUENCE_NAME, VR::SH, p.name)
        .dsv(tags::REPETITION_TIME, &[p.tr])
        .dsv(tags::ECHO_TIME, &[p.te])
        .dsv(tags::NUMBER_OF_AVERAGES, &[2.0])
        .dsv(tags::IMAGING_FREQUENCY, &[63.676])
        .s(tags::IMAGED_NUCLEUS, VR::SH, "1H")
        .s(tags::ECHO_NUMBERS, VR::IS, "1")
        .dsv(tags::MAGNETIC_FIELD_STRENGTH, &[1.5])
        .dsv(tags::SPACING_BETWEEN_SLICES, &[s.thickness * 1.2])
        .s(tags::ECHO_TRAIN_LENGTH, VR::IS, p.etl.to_string())
        .dsv(tags::PERCENT_SAMPLING, &[100.0])
        .dsv(tags::PERCENT_PHASE_FIELD_OF_VIEW, &[100.0])
        .dsv(tags::PIXEL_BANDWIDTH, &[190.0])
        .s(tags::TRANSMIT_COIL_NAME, VR::SH, "Body")
        .s(tags::RECEIVE_COIL_NAME, VR::SH, "Head_16")
        .raw(
            tags::ACQUISITION_MATRIX,
            VR::US,
            PrimitiveValue::U16([0, n, n, 0].to_vec().into()),
        )
        .s(tags::IN_PLANE_PHASE_ENCODING_DIRECTION, VR::CS, "ROW")
        .dsv(tags::FLIP_ANGLE, &[p.flip])
        .s(tags::ACQUISITION_NUMBER, VR::IS, "1")
        .dsv(tags::WINDOW_CENTER, &[p.window[0]])
        .dsv(tags::WINDOW_WIDTH, &[p.window[1]]);
    if let Some(ti) = p.ti {
        d.dsv(tags::INVERSION_TIME, &[ti]);
    }
    image_plane(&mut d, s, 0.0);
    image_pixel(&mut d, s.n, s.n, 1, "MONOCHROME2", 16, 12, false);
    lossy(&mut d, None);
    let px = pixels::mr_slice(s.n, s.spacing, s.z, weighting, rng);
    put_pixels_u16(&mut d, vec![px], s.n, s.n, ts);
    d
}

/// A projection radiograph's matrix and detector pitch.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Projection {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
}

impl Projection {
    /// Detector element pitch so the field is about 430 mm wide.
    fn pitch(self) -> f64 {
        (430.0 / self.rows.max(self.cols) as f64 * 1000.0).round() / 1000.0
    }
}

fn xray_exposure(d: &mut Ds, pitch: f64) {
    d.dsv(tags::KVP, &[125.0])
        .s(tags::EXPOSURE_TIME, VR::IS, "8")
        .s(tags::X_RAY_TUBE_CURRENT, VR::IS, "320")
        .s(tags::EXPOSURE, VR::IS, "3")
        .dsv(tags::DISTANCE_SOURCE_TO_DETECTOR, &[1800.0])
        .dsv(tags::IMAGER_PIXEL_SPACING, &[pitch, pitch])
        .s(tags::VIEW_POSITION, VR::CS, "PA")
        .m(tags::PATIENT_ORIENTATION, VR::CS, &["L", "F"]);
}

/// Digital X-Ray Image Storage - For Presentation: PA chest, MONOCHROME2.
pub(crate) fn dx(inst: &Inst<'_>, g: Projection, ts: Ts, rng: &mut Rng) -> Ds {
    let mut d = common(inst);
    image_times(&mut d, inst);
    let pitch = g.pitch();
    d.m(tags::IMAGE_TYPE, VR::CS, &["ORIGINAL", "PRIMARY"])
        .s(tags::PRESENTATION_INTENT_TYPE, VR::CS, "FOR PRESENTATION")
        .s(tags::ACQUISITION_NUMBER, VR::IS, "1")
        .s(tags::PIXEL_INTENSITY_RELATIONSHIP, VR::CS, "LOG")
        .raw(
            tags::PIXEL_INTENSITY_RELATIONSHIP_SIGN,
            VR::SS,
            PrimitiveValue::from(1i16),
        )
        .dsv(tags::RESCALE_INTERCEPT, &[0.0])
        .dsv(tags::RESCALE_SLOPE, &[1.0])
        .s(tags::RESCALE_TYPE, VR::LO, "US")
        .s(tags::PRESENTATION_LUT_SHAPE, VR::CS, "IDENTITY")
        .s(tags::BURNED_IN_ANNOTATION, VR::CS, "NO")
        .s(tags::IMAGE_LATERALITY, VR::CS, "U")
        .seq(
            tags::ANATOMIC_REGION_SEQUENCE,
            vec![code("51185008", "SCT", "Chest")],
        )
        .s(tags::POSITIONER_TYPE, VR::CS, "COLUMN")
        .seq(
            tags::VIEW_CODE_SEQUENCE,
            vec![code("399348003", "SCT", "postero-anterior")],
        )
        .seq(tags::ACQUISITION_CONTEXT_SEQUENCE, vec![])
        .s(tags::DETECTOR_TYPE, VR::CS, "SCINTILLATOR")
        .s(tags::DETECTOR_CONFIGURATION, VR::CS, "AREA")
        .dsv(tags::WINDOW_CENTER, &[1900.0])
        .dsv(tags::WINDOW_WIDTH, &[3200.0]);
    xray_exposure(&mut d, pitch);
    image_pixel(&mut d, g.rows, g.cols, 1, "MONOCHROME2", 16, 12, false);
    lossy(&mut d, None);
    let px = pixels::chest_radiograph(g.rows, g.cols, rng);
    put_pixels_u16(&mut d, vec![px], g.rows, g.cols, ts);
    d
}

/// Computed Radiography Image Storage: PA chest, MONOCHROME1 (so high
/// stored values display dark).
pub(crate) fn cr(inst: &Inst<'_>, g: Projection, ts: Ts, rng: &mut Rng) -> Ds {
    let mut d = common(inst);
    image_times(&mut d, inst);
    let pitch = g.pitch();
    d.m(tags::IMAGE_TYPE, VR::CS, &["ORIGINAL", "PRIMARY"])
        .s(tags::ACQUISITION_NUMBER, VR::IS, "1")
        .s(tags::PLATE_TYPE, VR::SH, "ST-VI")
        .s(tags::PHOSPHOR_TYPE, VR::LO, "BaFBr:Eu")
        .dsv(tags::SENSITIVITY, &[200.0])
        .dsv(tags::WINDOW_CENTER, &[2200.0])
        .dsv(tags::WINDOW_WIDTH, &[3200.0]);
    xray_exposure(&mut d, pitch);
    image_pixel(&mut d, g.rows, g.cols, 1, "MONOCHROME1", 16, 12, false);
    lossy(&mut d, None);
    let px: Vec<u16> = pixels::chest_radiograph(g.rows, g.cols, rng)
        .into_iter()
        .map(|v| 4095 - v)
        .collect();
    put_pixels_u16(&mut d, vec![px], g.rows, g.cols, ts);
    d
}

/// Ultrasound Multi-frame Image Storage: RGB cine loop (YBR_FULL_422 when
/// JPEG compressed), with one calibrated region.
pub(crate) fn us(
    inst: &Inst<'_>,
    rows: usize,
    cols: usize,
    frames: usize,
    ts: Ts,
    rng: &mut Rng,
) -> Ds {
    let mut d = common(inst);
    image_times(&mut d, inst);
    let frame_ms = 40.0;
    d.m(
        tags::IMAGE_TYPE,
        VR::CS,
        &["ORIGINAL", "PRIMARY", "ABDOMINAL", "0011"],
    )
    .s(tags::NUMBER_OF_FRAMES, VR::IS, frames.to_string())
    .at(tags::FRAME_INCREMENT_POINTER, tags::FRAME_TIME)
    .dsv(tags::FRAME_TIME, &[frame_ms])
    .s(
        tags::CINE_RATE,
        VR::IS,
        format!("{}", (1000.0 / frame_ms) as u32),
    )
    .us(tags::ULTRASOUND_COLOR_DATA_PRESENT, 1)
    .s(tags::PATIENT_ORIENTATION, VR::CS, "")
    .s(tags::BURNED_IN_ANNOTATION, VR::CS, "NO")
    .s(tags::TRANSDUCER_TYPE, VR::CS, "CURVED LINEAR");
    // one 2D tissue region covering the sector, 0.06 cm per pixel
    let mut region = Ds::new();
    region
        .us(tags::REGION_SPATIAL_FORMAT, 1)
        .us(tags::REGION_DATA_TYPE, 1)
        .ul(tags::REGION_FLAGS, 0)
        .ul(tags::REGION_LOCATION_MIN_X0, 0)
        .ul(tags::REGION_LOCATION_MIN_Y0, 0)
        .ul(tags::REGION_LOCATION_MAX_X1, cols as u32 - 1)
        .ul(tags::REGION_LOCATION_MAX_Y1, rows as u32 - 1)
        .us(tags::PHYSICAL_UNITS_X_DIRECTION, 3)
        .us(tags::PHYSICAL_UNITS_Y_DIRECTION, 3)
        .raw(
            tags::PHYSICAL_DELTA_X,
            VR::FD,
            PrimitiveValue::from(0.06f64),
        )
        .raw(
            tags::PHYSICAL_DELTA_Y,
            VR::FD,
            PrimitiveValue::from(0.06f64),
        );
    d.seq(tags::SEQUENCE_OF_ULTRASOUND_REGIONS, vec![region]);
    let photometric = if ts == Ts::JpegBaseline {
        "YBR_FULL_422"
    } else {
        "RGB"
    };
    image_pixel(&mut d, rows, cols, 3, photometric, 8, 8, false);
    let px = pixels::us_frames(rows, cols, frames, rng);
    let ratio = put_pixels_u8(&mut d, px, rows, cols, 3, ts);
    lossy(&mut d, ratio);
    d
}

/// 12-Lead ECG Waveform Storage: 12 channels, 500 Hz, 10 s.
pub(crate) fn ecg(inst: &Inst<'_>, rng: &mut Rng) -> Ds {
    let mut d = common(inst);
    let date = inst.study.date.da();
    d.s(tags::CONTENT_DATE, VR::DA, &date)
        .s(tags::CONTENT_TIME, VR::TM, tm(inst.time))
        .s(
            tags::ACQUISITION_DATE_TIME,
            VR::DT,
            format!("{date}{}", tm(inst.time)),
        )
        .seq(tags::ACQUISITION_CONTEXT_SEQUENCE, vec![]);
    let (samples, _bpm) = ecg::twelve_lead(rng);
    let channels: Vec<Ds> = ecg::LEADS
        .iter()
        .enumerate()
        .map(|(i, (value, meaning))| {
            let mut ch = Ds::new();
            ch.s(tags::WAVEFORM_CHANNEL_NUMBER, VR::IS, (i + 1).to_string())
                .s(
                    tags::CHANNEL_LABEL,
                    VR::SH,
                    meaning.trim_start_matches("Lead "),
                )
                .seq(
                    tags::CHANNEL_SOURCE_SEQUENCE,
                    vec![code(value, "MDC", meaning)],
                )
                .dsv(tags::CHANNEL_SENSITIVITY, &[ecg::SENSITIVITY_UV])
                .seq(
                    tags::CHANNEL_SENSITIVITY_UNITS_SEQUENCE,
                    vec![code("uV", "UCUM", "microvolt")],
                )
                .dsv(tags::CHANNEL_SENSITIVITY_CORRECTION_FACTOR, &[1.0])
                .dsv(tags::CHANNEL_BASELINE, &[0.0])
                .dsv(tags::CHANNEL_TIME_SKEW, &[0.0])
                .us(tags::WAVEFORM_BITS_STORED, 16)
                .dsv(tags::FILTER_LOW_FREQUENCY, &[0.05])
                .dsv(tags::FILTER_HIGH_FREQUENCY, &[150.0])
                .dsv(tags::NOTCH_FILTER_FREQUENCY, &[50.0]);
            ch
        })
        .collect();
    let mut wf = Ds::new();
    wf.s(tags::WAVEFORM_ORIGINALITY, VR::CS, "ORIGINAL")
        .us(tags::NUMBER_OF_WAVEFORM_CHANNELS, 12)
        .ul(tags::NUMBER_OF_WAVEFORM_SAMPLES, ecg::SAMPLES as u32)
        .dsv(tags::SAMPLING_FREQUENCY, &[f64::from(ecg::SAMPLING_HZ)])
        .s(tags::MULTIPLEX_GROUP_LABEL, VR::SH, "RHYTHM")
        .seq(tags::CHANNEL_DEFINITION_SEQUENCE, channels)
        .us(tags::WAVEFORM_BITS_ALLOCATED, 16)
        .s(tags::WAVEFORM_SAMPLE_INTERPRETATION, VR::CS, "SS")
        .raw(
            tags::WAVEFORM_DATA,
            VR::OW,
            PrimitiveValue::I16(samples.into()),
        );
    d.seq(tags::WAVEFORM_SEQUENCE, vec![wf]);
    d
}

/// Encapsulated PDF Storage: a one-page report about the study.
pub(crate) fn pdf_report(inst: &Inst<'_>, findings: &[String]) -> Ds {
    let st = inst.study;
    let mut d = common(inst);
    let date = st.date.da();
    let p = &st.patient;
    let mut lines = vec![
        format!(
            "Patient: {}   ID: {} ({})",
            p.person.latin(),
            p.id,
            p.clinic.id
        ),
        format!(
            "Sex: {}   Born: {}   Accession: {}",
            p.person.sex.code(),
            p.person.birth.da(),
            st.accession
        ),
        format!("Study: {} on {}", st.id, date),
        String::new(),
        "Findings:".to_string(),
    ];
    lines.extend(findings.iter().cloned());
    lines.push(String::new());
    lines.push("SYNTHETIC TEST DOCUMENT - every person in it is invented.".to_string());
    let doc = pdf::report("County Hospital Imaging Report", &lines);
    let len = doc.len() as u32;
    let mut doc = doc;
    if doc.len() % 2 == 1 {
        doc.push(0);
    }
    d.s(tags::CONTENT_DATE, VR::DA, &date)
        .s(tags::CONTENT_TIME, VR::TM, tm(inst.time))
        .s(
            tags::ACQUISITION_DATE_TIME,
            VR::DT,
            format!("{date}{}", tm(inst.time)),
        )
        .s(tags::CONVERSION_TYPE, VR::CS, "WSD")
        .s(tags::BURNED_IN_ANNOTATION, VR::CS, "YES")
        .s(tags::DOCUMENT_TITLE, VR::ST, "影像诊断报告")
        .seq(
            tags::CONCEPT_NAME_CODE_SEQUENCE,
            vec![code("18748-4", "LN", "Diagnostic imaging report")],
        )
        .s(
            tags::MIME_TYPE_OF_ENCAPSULATED_DOCUMENT,
            VR::LO,
            "application/pdf",
        )
        .ul(tags::ENCAPSULATED_DOCUMENT_LENGTH, len)
        .raw(
            tags::ENCAPSULATED_DOCUMENT,
            VR::OB,
            PrimitiveValue::from(doc),
        );
    d
}

/// SOP classes by kind, for callers that plan instances.
pub(crate) mod sop {
    use super::uids;
    pub(crate) const CT: &str = uids::CT_IMAGE_STORAGE;
    pub(crate) const MR: &str = uids::MR_IMAGE_STORAGE;
    pub(crate) const DX: &str = uids::DIGITAL_X_RAY_IMAGE_STORAGE_FOR_PRESENTATION;
    pub(crate) const CR: &str = uids::COMPUTED_RADIOGRAPHY_IMAGE_STORAGE;
    pub(crate) const US: &str = uids::ULTRASOUND_MULTI_FRAME_IMAGE_STORAGE;
    pub(crate) const ECG: &str = uids::TWELVE_LEAD_ECG_WAVEFORM_STORAGE;
    pub(crate) const PDF: &str = uids::ENCAPSULATED_PDF_STORAGE;
}
