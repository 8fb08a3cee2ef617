//! A synthetic resting 12-lead ECG: a moving cardiac dipole projected on
//! the limb and precordial leads, sampled at 500 Hz for 10 s.
//!
//! Limb leads obey Einthoven and Goldberger exactly
//! (III = II - I, aVR = -(I + II)/2, aVL = I - II/2, aVF = II - I/2).

use crate::rng::Rng;

pub(crate) const SAMPLING_HZ: u32 = 500;
pub(crate) const SECONDS: u32 = 10;
pub(crate) const SAMPLES: usize = (SAMPLING_HZ * SECONDS) as usize;
/// Microvolts per stored count.
pub(crate) const SENSITIVITY_UV: f64 = 2.5;

/// Lead code (CID 3001, MDC), code meaning.
pub(crate) const LEADS: [(&str, &str); 12] = [
    ("2:1", "Lead I"),
    ("2:2", "Lead II"),
    ("2:61", "Lead III"),
    ("2:62", "Lead aVR"),
    ("2:63", "Lead aVL"),
    ("2:64", "Lead aVF"),
    ("2:3", "Lead V1"),
    ("2:4", "Lead V2"),
    ("2:5", "Lead V3"),
    ("2:6", "Lead V4"),
    ("2:7", "Lead V5"),
    ("2:8", "Lead V6"),
];

fn bump(t: f64, centre: f64, width: f64) -> f64 {
    let d = (t - centre) / width;
    (-0.5 * d * d).exp()
}

/// Dipole (x = leftward, y = downward, z = anterior) in millivolts at time
/// `t` seconds after the start of a beat.
fn dipole(t: f64, rr: f64) -> [f64; 3] {
    let p = 0.15 * bump(t, 0.10, 0.022);
    let q = -0.12 * bump(t, 0.175, 0.008);
    let r = 1.3 * bump(t, 0.20, 0.010);
    let s = -0.35 * bump(t, 0.225, 0.010);
    // T wave follows the RR interval a little (QT shortens at high rates)
    let t_wave = 0.32 * bump(t, 0.20 + 0.22 * (rr / 0.85).sqrt(), 0.045);
    [
        p * 0.7 + q * 0.6 + r * 0.75 + s * 0.2 + t_wave * 0.8,
        p * 0.8 + q * 0.3 + r * 0.55 + s * 0.5 + t_wave * 0.55,
        p * 0.2 + q * 0.4 - r * 0.35 + s * 1.0 - t_wave * 0.25,
    ]
}

/// Precordial lead directions in the (x, y, z) frame: V1 rightward and
/// anterior through V6 leftward.
const PRECORDIAL: [[f64; 3]; 6] = [
    [-0.55, 0.1, 0.85],
    [-0.2, 0.1, 1.0],
    [0.25, 0.1, 0.9],
    [0.65, 0.15, 0.6],
    [0.9, 0.15, 0.25],
    [1.0, 0.15, 0.0],
];

/// The 12 channels multiplexed (sample-major: all 12 leads of sample 0,
/// then sample 1, ...) as signed counts of `SENSITIVITY_UV`.
/// Returns the samples and the heart rate in beats per minute.
pub(crate) fn twelve_lead(rng: &mut Rng) -> (Vec<i16>, u32) {
    let bpm = rng.range(56, 96) as f64;
    let rr = 60.0 / bpm;
    let wander_phase = rng.unit() * std::f64::consts::TAU;
    let axis_rot = (rng.unit() - 0.5) * 0.5; // individual QRS axis
    let mut out = Vec::with_capacity(SAMPLES * 12);
    let dt = 1.0 / f64::from(SAMPLING_HZ);
    let beat_jitter: Vec<f64> = (0..((SECONDS as f64 / rr) as usize + 2))
        .map(|_| rr * (1.0 + 0.03 * rng.gauss()))
        .collect();
    let mut beat_start = 0.0;
    let mut beat = 0;
    for i in 0..SAMPLES {
        let t = i as f64 * dt;
        while t - beat_start >= beat_jitter[beat] {
            beat_start += beat_jitter[beat];
            beat += 1;
        }
        let [x0, y0, z] = dipole(t - beat_start, rr);
        let (sa, ca) = axis_rot.sin_cos();
        let x = x0 * ca - y0 * sa;
        let y = x0 * sa + y0 * ca;
        let wander = 0.05 * (0.33 * std::f64::consts::TAU * t + wander_phase).sin();
        // limb leads in the frontal plane (Einthoven triangle)
        let lead_i = x + wander;
        let lead_ii = 0.5 * x + 0.866 * y + wander * 0.8;
        let limb = [
            lead_i,
            lead_ii,
            lead_ii - lead_i,
            -(lead_i + lead_ii) / 2.0,
            lead_i - lead_ii / 2.0,
            lead_ii - lead_i / 2.0,
        ];
        let mut mv = [0.0; 12];
        mv[..6].copy_from_slice(&limb);
        for (k, dir) in PRECORDIAL.iter().enumerate() {
            mv[6 + k] = 1.6 * (x * dir[0] + y * dir[1] + z * dir[2]) + wander * 0.5;
        }
        for v in mv {
            let noise = rng.gauss() * 0.008;
            let counts = ((v + noise) * 1000.0 / SENSITIVITY_UV).round();
            out.push(counts.clamp(-32767.0, 32767.0) as i16);
        }
    }
    (out, bpm as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_and_einthoven() {
        let (s, bpm) = twelve_lead(&mut Rng::new(5));
        assert_eq!(s.len(), SAMPLES * 12);
        assert!((56..=96).contains(&bpm));
        // R peaks reach about 1 mV in lead II
        let max_ii = s.iter().skip(1).step_by(12).max().unwrap();
        assert!(f64::from(*max_ii) * SENSITIVITY_UV > 500.0);
        // III = II - I within rounding and noise
        for k in (0..SAMPLES).step_by(97) {
            let (i, ii, iii) = (s[k * 12], s[k * 12 + 1], s[k * 12 + 2]);
            assert!((i32::from(ii) - i32::from(i) - i32::from(iii)).abs() < 30);
        }
    }
}
