//! The profiles: which patients, studies, series and instances to write,
//! and the bookkeeping (UIDs, counters, paths) while writing them.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use crate::ds::{self, Ds, Ts};
use crate::iod::{self, Inst, Projection, Slice, sop};
use crate::model::{
    BAISHUI_DR, BAISHUI_ECG, COUNTY, COUNTYWS1, Charset, Clinic, Device, Patient, Series, Study,
    XINZHEN_CT, XINZHEN_US,
};
use crate::people::{Date, Person};
use crate::pixels::{MrWeighting, Region};
use crate::rng::{self, Rng};
use crate::{Options, Profile, SampleFile};

/// Latest study date: output must not depend on the clock, so "the last
/// few years" end on this fixed day.
const LAST_DAY: Date = Date::new(2025, 12, 31);
const FIRST_DAY: Date = Date::new(2022, 1, 1);

/// Generator state for one run.
pub(crate) struct World {
    out_dir: PathBuf,
    rng: Rng,
    uid_rng: Rng,
    pixel_base: Rng,
    instance_counter: u64,
    /// Next local patient number per clinic.
    patient_counters: HashMap<&'static str, u64>,
    /// Next study folder number per clinic.
    study_counters: HashMap<&'static str, u32>,
    accession_counter: u32,
    pub(crate) files: Vec<SampleFile>,
}

/// A study plus where its files go.
pub(crate) struct StudyCtx {
    pub(crate) study: Study,
    dir: PathBuf,
    next_file: HashMap<&'static str, u32>,
    next_series: u32,
    /// Seconds after midnight of the next series.
    clock: u32,
}

impl World {
    pub(crate) fn new(out_dir: &Path, seed: u64) -> World {
        let root = Rng::new(seed);
        World {
            out_dir: out_dir.to_path_buf(),
            rng: root.fork("choices"),
            uid_rng: root.fork("uids"),
            pixel_base: root.fork("pixels"),
            instance_counter: 0,
            patient_counters: HashMap::new(),
            study_counters: HashMap::new(),
            accession_counter: 0,
            files: Vec::new(),
        }
    }

    pub(crate) fn uid(&mut self) -> String {
        rng::uid(&mut self.uid_rng)
    }

    pub(crate) fn person(&mut self) -> Person {
        Person::draw(
            &mut self.rng,
            Date::new(1938, 1, 1),
            Date::new(2012, 12, 31),
        )
    }

    /// Register `person` at `clinic` with a new local Patient ID.
    pub(crate) fn register(&mut self, person: &Person, clinic: &'static Clinic) -> Patient {
        let n = self.patient_counters.entry(clinic.id).or_insert(0);
        *n += 1;
        let n = *n;
        // sparse but unique local numbers, like a real registry's
        let id = format!(
            "{}{:07}",
            clinic.prefix,
            100_000 + n * 37 + self.rng.below(37)
        );
        Patient {
            person: person.clone(),
            clinic,
            id,
        }
    }

    pub(crate) fn random_date(&mut self) -> Date {
        let span = LAST_DAY.to_days() - FIRST_DAY.to_days();
        FIRST_DAY.add_days(self.rng.range(0, span))
    }

    fn referring(&mut self) -> String {
        let p = Person::draw(&mut self.rng, Date::new(1960, 1, 1), Date::new(1990, 1, 1));
        p.pn()
    }

    /// Open a study in the clinic's folder.
    pub(crate) fn study(
        &mut self,
        patient: &Patient,
        device: &'static Device,
        date: Date,
        description: &str,
        charset: Option<Charset>,
    ) -> StudyCtx {
        let clinic = device.clinic;
        let folder = self.study_counters.entry(clinic.id).or_insert(0);
        *folder += 1;
        let folder = *folder;
        self.accession_counter += 1;
        let accession = format!("{}{}{:06}", clinic.prefix, date.y, self.accession_counter);
        let id = format!("S{:04}{:04}", date.y % 10_000, folder);
        let time = 8 * 3600 + self.rng.below(9 * 3600) as u32;
        let referring = self.referring();
        let study = Study {
            uid: self.uid(),
            patient: patient.clone(),
            device,
            charset: charset.unwrap_or(device.charset),
            date,
            time,
            accession,
            id,
            description: description.to_string(),
            referring,
        };
        StudyCtx {
            study,
            dir: self
                .out_dir
                .join(clinic.id)
                .join(format!("study-{folder:04}")),
            next_file: HashMap::new(),
            next_series: 1,
            clock: time + 60,
        }
    }

    pub(crate) fn series(
        &mut self,
        st: &mut StudyCtx,
        modality: &'static str,
        description: &str,
        body_part: &'static str,
    ) -> Series {
        let number = st.next_series;
        st.next_series += 1;
        let time = st.clock;
        st.clock += 300;
        Series {
            uid: self.uid(),
            number,
            modality,
            description: description.to_string(),
            body_part,
            time,
            frame_of_reference: self.uid(),
        }
    }

    fn pixel_rng(&mut self) -> Rng {
        self.instance_counter += 1;
        self.pixel_base.fork(&self.instance_counter.to_string())
    }

    /// Build one instance with `build` and write it.
    pub(crate) fn emit(
        &mut self,
        st: &mut StudyCtx,
        se: &Series,
        sop_class: &'static str,
        number: u32,
        ts: Ts,
        build: impl FnOnce(&Inst<'_>, &mut Rng) -> Ds,
    ) -> io::Result<()> {
        let inst = Inst {
            study: &st.study,
            series: se,
            sop_class,
            sop_uid: self.uid(),
            number,
            time: se.time + 5 * number,
        };
        let mut rng = self.pixel_rng();
        let ds = build(&inst, &mut rng);
        let counter = st.next_file.entry(se.modality).or_insert(0);
        *counter += 1;
        std::fs::create_dir_all(&st.dir)?;
        let path = st.dir.join(format!("{}-{:04}.dcm", se.modality, counter));
        let ae = st.study.device.ae;
        let size = ds::write_part10(&path, &ds, ts, ae)?;
        let p = &st.study.patient;
        self.files.push(SampleFile {
            path,
            sop_class_uid: sop_class.to_string(),
            sop_instance_uid: inst.sop_uid.clone(),
            study_instance_uid: st.study.uid.clone(),
            transfer_syntax: ts.uid().to_string(),
            modality: se.modality.to_string(),
            clinic_ae: ae.to_string(),
            size,
            patient_id: p.id.clone(),
            issuer_of_patient_id: p.clinic.id.to_string(),
            resident_id: p.person.resident_id.clone(),
        });
        Ok(())
    }

    // ---- series writers -------------------------------------------------

    pub(crate) fn ct_series(
        &mut self,
        st: &mut StudyCtx,
        region: Region,
        slices: usize,
        ts: Ts,
    ) -> io::Result<()> {
        let (desc, part) = match region {
            Region::Head => ("Head 5mm", "HEAD"),
            Region::Chest => ("Chest 5mm", "CHEST"),
            Region::Abdomen => ("Abdomen 5mm", "ABDOMEN"),
        };
        let se = self.series(st, "CT", desc, part);
        let thickness = 5.0;
        let z0 = match region {
            Region::Head => -40.0,
            Region::Chest => -120.0,
            Region::Abdomen => -320.0,
        };
        for i in 0..slices {
            let s = Slice {
                n: 512,
                spacing: if region == Region::Head {
                    0.48828125
                } else {
                    0.703125
                },
                thickness,
                z: z0 + thickness * i as f64,
            };
            self.emit(st, &se, sop::CT, i as u32 + 1, ts, |inst, rng| {
                iod::ct(inst, s, region, ts, rng)
            })?;
        }
        Ok(())
    }

    pub(crate) fn mr_series(
        &mut self,
        st: &mut StudyCtx,
        weighting: MrWeighting,
        slices: usize,
        ts: Ts,
    ) -> io::Result<()> {
        let description = match weighting {
            MrWeighting::T1 => "T1 SE axial",
            MrWeighting::T2 => "T2 TSE axial",
            MrWeighting::Flair => "FLAIR axial",
        };
        let se = self.series(st, "MR", description, "HEAD");
        let thickness = 5.0;
        for i in 0..slices {
            let z = (i as f64 - slices as f64 / 2.0) * thickness * 1.2;
            let s = Slice {
                n: 256,
                spacing: 0.9375,
                thickness,
                z,
            };
            self.emit(st, &se, sop::MR, i as u32 + 1, ts, |inst, rng| {
                iod::mr(inst, s, weighting, ts, rng)
            })?;
        }
        Ok(())
    }

    pub(crate) fn dx_image(&mut self, st: &mut StudyCtx, g: Projection, ts: Ts) -> io::Result<()> {
        let se = self.series(st, "DX", "Chest PA", "CHEST");
        self.emit(st, &se, sop::DX, 1, ts, |inst, rng| {
            iod::dx(inst, g, ts, rng)
        })
    }

    pub(crate) fn cr_image(&mut self, st: &mut StudyCtx, g: Projection, ts: Ts) -> io::Result<()> {
        let se = self.series(st, "CR", "Chest PA", "CHEST");
        self.emit(st, &se, sop::CR, 1, ts, |inst, rng| {
            iod::cr(inst, g, ts, rng)
        })
    }

    pub(crate) fn us_loops(
        &mut self,
        st: &mut StudyCtx,
        description: &str,
        syntaxes: &[Ts],
        frames: usize,
    ) -> io::Result<()> {
        let se = self.series(st, "US", description, "ABDOMEN");
        for (i, ts) in syntaxes.iter().enumerate() {
            let ts = *ts;
            self.emit(st, &se, sop::US, i as u32 + 1, ts, |inst, rng| {
                iod::us(inst, 240, 320, frames, ts, rng)
            })?;
        }
        Ok(())
    }

    pub(crate) fn ecg(&mut self, st: &mut StudyCtx, ts: Ts) -> io::Result<()> {
        let se = self.series(st, "ECG", "Resting 12-lead ECG", "");
        self.emit(st, &se, sop::ECG, 1, ts, iod::ecg)
    }

    pub(crate) fn pdf(&mut self, st: &mut StudyCtx, findings: &[&str]) -> io::Result<()> {
        let se = self.series(st, "DOC", "Report", "");
        let findings: Vec<String> = findings.iter().map(|s| (*s).to_string()).collect();
        self.emit(st, &se, sop::PDF, 1, Ts::ExplicitLe, |inst, _| {
            iod::pdf_report(inst, &findings)
        })
    }
}

const MR_FINDINGS: &[&str] = &[
    "No acute intracranial abnormality.",
    "Ventricles and sulci are normal for age.",
    "A few punctate T2 hyperintensities in the white matter, nonspecific.",
];

/// Run a profile.
pub(crate) fn run(out_dir: &Path, options: &Options) -> io::Result<Vec<SampleFile>> {
    std::fs::create_dir_all(out_dir)?;
    let mut w = World::new(out_dir, options.seed);
    match options.profile {
        Profile::Small => small(&mut w)?,
        Profile::Demo => demo(&mut w)?,
        Profile::Bench => bench(&mut w)?,
    }
    Ok(w.files)
}

/// Every kind once, 12 files, a few MB.
fn small(w: &mut World) -> io::Result<()> {
    let px = Projection {
        rows: 640,
        cols: 512,
    };
    // a person seen at Xinzhen (CT) and later at the county hospital (MR)
    let a = w.person();
    let a_xz = w.register(&a, XINZHEN_CT.clinic);
    let a_cy = w.register(&a, &COUNTY);
    let d1 = w.random_date();
    let mut st = w.study(&a_xz, &XINZHEN_CT, d1, "胸部CT平扫", None);
    w.ct_series(&mut st, Region::Chest, 3, Ts::ExplicitLe)?;

    let b = w.person();
    let b_xz = w.register(&b, XINZHEN_US.clinic);
    let date = w.random_date();
    let mut st = w.study(&b_xz, &XINZHEN_US, date, "腹部超声", None);
    w.us_loops(&mut st, "Liver", &[Ts::JpegBaseline, Ts::ExplicitLe], 10)?;

    // Baishui's DR speaks GB18030
    let c = w.person();
    let c_bs = w.register(&c, BAISHUI_DR.clinic);
    let date = w.random_date();
    let mut st = w.study(&c_bs, &BAISHUI_DR, date, "胸部正位片", None);
    w.dx_image(&mut st, px, Ts::ImplicitLe)?;
    let date2 = date.add_days(200.min(LAST_DAY.to_days() - date.to_days()));
    let mut st = w.study(&c_bs, &BAISHUI_DR, date2, "胸部正位片", None);
    w.cr_image(&mut st, px, Ts::ExplicitBe)?;

    let d = w.person();
    let d_bs = w.register(&d, BAISHUI_ECG.clinic);
    let date = w.random_date();
    let mut st = w.study(&d_bs, &BAISHUI_ECG, date, "常规十二导联心电图", None);
    w.ecg(&mut st, Ts::Deflated)?;
    let mut st = w.study(
        &d_bs,
        &BAISHUI_ECG,
        date.add_days(-365),
        "常规十二导联心电图",
        None,
    );
    w.ecg(&mut st, Ts::ExplicitLe)?;

    let d2 = d1.add_days(30.min(LAST_DAY.to_days() - d1.to_days()));
    let mut st = w.study(&a_cy, &COUNTYWS1, d2, "头颅MR平扫", None);
    w.mr_series(&mut st, MrWeighting::T2, 2, Ts::Rle)?;
    w.pdf(&mut st, MR_FINDINGS)?;
    Ok(())
}

/// A few studies per clinic, every kind and syntax, ~170 files.
fn demo(w: &mut World) -> io::Result<()> {
    let px = Projection {
        rows: 1500,
        cols: 1200,
    };
    let people: Vec<Person> = (0..14).map(|_| w.person()).collect();
    // people 0..4 are seen at a township clinic and at the county hospital
    let xz: Vec<Patient> = people[0..6]
        .iter()
        .map(|p| w.register(p, XINZHEN_CT.clinic))
        .collect();
    let bs: Vec<Patient> = people[6..12]
        .iter()
        .chain(people[2..4].iter())
        .map(|p| w.register(p, BAISHUI_DR.clinic))
        .collect();
    let cy: Vec<Patient> = people[0..2]
        .iter()
        .chain(people[6..8].iter())
        .chain(people[12..14].iter())
        .map(|p| w.register(p, &COUNTY))
        .collect();

    // Xinzhen: CT and ultrasound
    let mut dates = Vec::new();
    for (i, (region, desc, ts)) in [
        (Region::Chest, "胸部CT平扫", Ts::ExplicitLe),
        (Region::Abdomen, "上腹部CT增强", Ts::ExplicitLe),
        (Region::Head, "头颅CT平扫", Ts::Rle),
    ]
    .into_iter()
    .enumerate()
    {
        let date = w.random_date();
        dates.push(date);
        let mut st = w.study(&xz[i], &XINZHEN_CT, date, desc, None);
        let n = if region == Region::Head { 20 } else { 24 };
        w.ct_series(&mut st, region, n, ts)?;
    }
    for (i, syntaxes) in [
        vec![Ts::JpegBaseline, Ts::JpegBaseline],
        vec![Ts::ExplicitLe],
        vec![Ts::JpegBaseline, Ts::Rle],
    ]
    .into_iter()
    .enumerate()
    {
        let date = w.random_date();
        let mut st = w.study(&xz[3 + i], &XINZHEN_US, date, "腹部超声", None);
        w.us_loops(&mut st, "Liver and gallbladder", &syntaxes, 10)?;
    }

    // Baishui: radiographs (GB18030 device) and ECGs
    for (i, ts) in [
        Ts::ImplicitLe,
        Ts::ExplicitLe,
        Ts::ExplicitBe,
        Ts::ExplicitLe,
    ]
    .into_iter()
    .enumerate()
    {
        let date = w.random_date();
        let mut st = w.study(&bs[i], &BAISHUI_DR, date, "胸部正位片", None);
        if i % 2 == 0 {
            w.dx_image(&mut st, px, ts)?;
        } else {
            w.cr_image(&mut st, px, ts)?;
        }
    }
    // a patient from Xinzhen also X-rayed at Baishui (people[2])
    let date = w.random_date();
    let mut st = w.study(&bs[6], &BAISHUI_DR, date, "胸部正位片", None);
    w.dx_image(&mut st, px, Ts::ExplicitLe)?;
    for (i, ts) in [Ts::Deflated, Ts::ExplicitLe, Ts::ImplicitLe, Ts::ExplicitLe]
        .into_iter()
        .enumerate()
    {
        let date = w.random_date();
        let patient = if i == 3 { &bs[7] } else { &bs[2 + i] };
        let mut st = w.study(patient, &BAISHUI_ECG, date, "常规十二导联心电图", None);
        w.ecg(&mut st, ts)?;
    }

    // County: MR with reports, and CT priors of Xinzhen patients
    for (i, patient) in [&cy[0], &cy[2], &cy[4]].into_iter().enumerate() {
        let date = w.random_date();
        let mut st = w.study(patient, &COUNTYWS1, date, "头颅MR平扫", None);
        w.mr_series(&mut st, MrWeighting::T2, 16, Ts::ExplicitLe)?;
        w.mr_series(
            &mut st,
            if i == 0 {
                MrWeighting::Flair
            } else {
                MrWeighting::T1
            },
            if i == 0 { 16 } else { 8 },
            Ts::Rle,
        )?;
        w.pdf(&mut st, MR_FINDINGS)?;
    }
    let date = w.random_date();
    let mut st = w.study(&cy[1], &COUNTYWS1, date, "胸部CT平扫", None);
    w.ct_series(&mut st, Region::Chest, 24, Ts::ExplicitLe)?;
    w.pdf(
        &mut st,
        &[
            "Lungs are clear. No pleural effusion.",
            "Heart size normal.",
        ],
    )?;
    Ok(())
}

/// About 2,500 instances and 850 MB, mostly CT and MR, all explicit VR LE.
fn bench(w: &mut World) -> io::Result<()> {
    let ts = Ts::ExplicitLe;
    let px = Projection {
        rows: 1024,
        cols: 1024,
    };
    let people: Vec<Person> = (0..120).map(|_| w.person()).collect();
    let mut next = 0usize;
    let mut take = |w: &mut World, clinic: &'static Clinic| {
        let p = &people[next % people.len()];
        next += 1;
        w.register(p, clinic)
    };
    for i in 0..16 {
        let device = if i % 2 == 0 { &XINZHEN_CT } else { &COUNTYWS1 };
        let patient = take(w, device.clinic);
        let date = w.random_date();
        let region = [Region::Chest, Region::Abdomen, Region::Head][i % 3];
        let mut st = w.study(&patient, device, date, "CT", None);
        let n = 50 + w.rng.below(13) as usize;
        w.ct_series(&mut st, region, n, ts)?;
    }
    for _ in 0..20 {
        let patient = take(w, &COUNTY);
        let date = w.random_date();
        let mut st = w.study(&patient, &COUNTYWS1, date, "头颅MR平扫", None);
        for weighting in [MrWeighting::T2, MrWeighting::T1, MrWeighting::Flair] {
            let n = 20 + w.rng.below(11) as usize;
            w.mr_series(&mut st, weighting, n, ts)?;
        }
    }
    for _ in 0..20 {
        let patient = take(w, XINZHEN_US.clinic);
        let date = w.random_date();
        let mut st = w.study(&patient, &XINZHEN_US, date, "腹部超声", None);
        w.us_loops(&mut st, "Liver and gallbladder", &[ts, ts], 10)?;
    }
    for i in 0..30 {
        let patient = take(w, BAISHUI_DR.clinic);
        let date = w.random_date();
        let mut st = w.study(&patient, &BAISHUI_DR, date, "胸部正位片", None);
        if i % 3 == 0 {
            w.cr_image(&mut st, px, ts)?;
        } else {
            w.dx_image(&mut st, px, ts)?;
            if i % 3 == 1 {
                w.dx_image(&mut st, px, ts)?;
            }
        }
    }
    Ok(())
}
