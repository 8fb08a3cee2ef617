//! One very large multi-frame instance (Multi-frame Grayscale Word
//! Secondary Capture), written with the Pixel Data streamed frame by frame
//! so memory stays at a few frames whatever the size.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use dicom_core::VR;
use dicom_dictionary_std::{tags, uids};

use crate::SampleFile;
use crate::ds::{self, Ts};
use crate::generate::World;
use crate::iod::{self, Inst};
use crate::model::{COUNTY, COUNTYWS1};
use crate::pixels::{self, Region};
use crate::rng::Rng;

const N: usize = 512;
const FRAME_BYTES: u64 = (N * N * 2) as u64;
/// Distinct phantom frames computed up front and then cycled.
const DISTINCT: usize = 8;

/// See [`crate::write_large_instance`].
pub(crate) fn write(path: &Path, min_bytes: u64, seed: u64) -> io::Result<SampleFile> {
    let frames = min_bytes.div_ceil(FRAME_BYTES).max(1);
    let pixel_len = frames * FRAME_BYTES;
    if pixel_len > u64::from(u32::MAX - 1) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "Pixel Data of a native instance must stay below 4 GiB",
        ));
    }
    let frames = frames as usize;

    let mut w = World::new(path.parent().unwrap_or(Path::new(".")), seed);
    let person = w.person();
    let patient = w.register(&person, &COUNTY);
    let date = w.random_date();
    let mut st = w.study(&patient, &COUNTYWS1, date, "CT容积重建", None);
    let se = w.series(&mut st, "OT", "Volume (secondary capture)", "CHEST");
    let inst = Inst {
        study: &st.study,
        series: &se,
        sop_class: uids::MULTI_FRAME_GRAYSCALE_WORD_SECONDARY_CAPTURE_IMAGE_STORAGE,
        sop_uid: w.uid(),
        number: 1,
        time: se.time,
    };

    let mut d = iod::common(&inst);
    iod::image_times(&mut d, &inst);
    d.m(tags::IMAGE_TYPE, VR::CS, &["DERIVED", "SECONDARY"])
        .s(tags::CONVERSION_TYPE, VR::CS, "WSD")
        .s(tags::NUMBER_OF_FRAMES, VR::IS, frames.to_string())
        .at(tags::FRAME_INCREMENT_POINTER, tags::FRAME_TIME)
        .dsv(tags::FRAME_TIME, &[100.0])
        .s(tags::BURNED_IN_ANNOTATION, VR::CS, "NO")
        .s(tags::PRESENTATION_LUT_SHAPE, VR::CS, "IDENTITY")
        .m(tags::PATIENT_ORIENTATION, VR::CS, &["L", "P"])
        // stored values are HU + 1024, but SC knows only "US" (unspecified)
        .dsv(tags::RESCALE_INTERCEPT, &[0.0])
        .dsv(tags::RESCALE_SLOPE, &[1.0])
        .s(tags::RESCALE_TYPE, VR::LO, "US")
        .dsv(tags::WINDOW_CENTER, &[1064.0])
        .dsv(tags::WINDOW_WIDTH, &[400.0]);
    iod::image_pixel(&mut d, N, N, 1, "MONOCHROME2", 16, 12, false);
    iod::lossy(&mut d, None);

    let file = File::create(path)?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let ae = COUNTYWS1.ae;
    ds::write_header(&mut out, &d, Ts::ExplicitLe, ae)?;
    ds::write_dataset(&mut out, &d, Ts::ExplicitLe)?;
    // Pixel Data (7FE0,0010) OW with explicit length, appended last since
    // no attribute above it is present
    out.write_all(&[0xE0, 0x7F, 0x10, 0x00, b'O', b'W', 0, 0])?;
    out.write_all(&(pixel_len as u32).to_le_bytes())?;
    let mut rng = Rng::new(seed).fork("large-pixels");
    let base: Vec<Vec<u16>> = (0..DISTINCT.min(frames))
        .map(|k| {
            pixels::ct_slice(
                N,
                0.703125,
                -60.0 + 15.0 * k as f64,
                Region::Chest,
                &mut rng,
            )
        })
        .collect();
    let mut buf = vec![0u8; FRAME_BYTES as usize];
    for f in 0..frames {
        let src = &base[f % base.len()];
        // a frame-dependent offset keeps frames distinct without recomputing
        let bump = (f / base.len()) as u16 % 8;
        for (dst, v) in buf.chunks_exact_mut(2).zip(src) {
            dst.copy_from_slice(&(v + bump).min(4095).to_le_bytes());
        }
        out.write_all(&buf)?;
    }
    out.flush()?;
    drop(out);
    let size = std::fs::metadata(path)?.len();
    Ok(SampleFile {
        path: path.to_path_buf(),
        sop_class_uid: inst.sop_class.to_string(),
        sop_instance_uid: inst.sop_uid.clone(),
        study_instance_uid: st.study.uid.clone(),
        transfer_syntax: Ts::ExplicitLe.uid().to_string(),
        modality: se.modality.to_string(),
        clinic_ae: ae.to_string(),
        size,
        patient_id: patient.id.clone(),
        issuer_of_patient_id: patient.clinic.id.to_string(),
        resident_id: person.resident_id.clone(),
    })
}
