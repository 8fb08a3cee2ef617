//! Synthetic pixel data: phantom-like CT and MR slices, projection
//! radiographs and an ultrasound sector, all from ellipses and noise.

use crate::rng::Rng;

/// Body region of a cross-sectional phantom.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Region {
    Head,
    Chest,
    Abdomen,
}

/// A grid of values in patient millimetres, painted with ellipses.
struct Canvas {
    rows: usize,
    cols: usize,
    spacing: f64,
    data: Vec<f64>,
}

impl Canvas {
    fn new(rows: usize, cols: usize, spacing: f64, fill: f64) -> Canvas {
        Canvas {
            rows,
            cols,
            spacing,
            data: vec![fill; rows * cols],
        }
    }

    /// Pixel index range covering `[c - half, c + half]` mm along one axis.
    fn span(&self, centre: f64, half: f64, n: usize) -> (usize, usize) {
        let mid = (n as f64 - 1.0) / 2.0;
        let lo = ((centre - half) / self.spacing + mid).floor().max(0.0) as usize;
        let hi = ((centre + half) / self.spacing + mid).ceil().max(0.0) as usize;
        (lo.min(n), (hi + 1).min(n))
    }

    /// Set (or add, if `add`) `value` inside the ellipse centred at
    /// (`cx`, `cy`) mm with semi-axes `a`, `b`.
    fn ellipse(&mut self, cx: f64, cy: f64, a: f64, b: f64, value: f64, add: bool) {
        if a <= 0.0 || b <= 0.0 {
            return;
        }
        let (c0, c1) = self.span(cx, a, self.cols);
        let (r0, r1) = self.span(cy, b, self.rows);
        let midc = (self.cols as f64 - 1.0) / 2.0;
        let midr = (self.rows as f64 - 1.0) / 2.0;
        for r in r0..r1 {
            let y = (r as f64 - midr) * self.spacing;
            let dy = (y - cy) / b;
            let row = &mut self.data[r * self.cols..(r + 1) * self.cols];
            for (c, px) in row.iter_mut().enumerate().take(c1).skip(c0) {
                let x = (c as f64 - midc) * self.spacing;
                let dx = (x - cx) / a;
                if dx * dx + dy * dy <= 1.0 {
                    if add {
                        *px += value;
                    } else {
                        *px = value;
                    }
                }
            }
        }
    }
}

impl Canvas {
    /// Add `value` on the upper half of an elliptical band of width `t`
    /// on one side (`side` -1 = left of `cx`, 1 = right).
    #[allow(clippy::too_many_arguments)]
    fn arc(&mut self, cx: f64, cy: f64, a: f64, b: f64, t: f64, value: f64, side: f64) {
        let (c0, c1) = self.span(cx, a, self.cols);
        let (r0, r1) = self.span(cy, b, self.rows);
        let midc = (self.cols as f64 - 1.0) / 2.0;
        let midr = (self.rows as f64 - 1.0) / 2.0;
        for r in r0..r1 {
            let y = (r as f64 - midr) * self.spacing;
            if y > cy {
                continue;
            }
            for c in c0..c1 {
                let x = (c as f64 - midc) * self.spacing;
                if (x - cx) * side < 0.0 {
                    continue;
                }
                let d = ((x - cx) / a).hypot((y - cy) / b);
                if d <= 1.0 && d >= 1.0 - t / b {
                    self.data[r * self.cols + c] += value;
                }
            }
        }
    }
}

/// One axial CT slice in Hounsfield units, as stored values
/// (`HU + 1024`, 12 bits unsigned; the reconstruction circle edge is air).
pub(crate) fn ct_slice(n: usize, spacing: f64, z: f64, region: Region, rng: &mut Rng) -> Vec<u16> {
    let mut cv = Canvas::new(n, n, spacing, -1000.0);
    // slow variation along z so neighbouring slices differ plausibly
    let s = 1.0 + 0.08 * (z / 40.0).sin();
    match region {
        Region::Head => {
            cv.ellipse(0.0, 0.0, 78.0 * s, 98.0 * s, 30.0, false); // scalp
            cv.ellipse(0.0, 0.0, 73.0 * s, 93.0 * s, 1300.0, false); // skull
            cv.ellipse(0.0, -89.0 * s, 16.0, 4.0, -900.0, false); // frontal sinus
            cv.ellipse(0.0, 0.0, 66.0 * s, 86.0 * s, 8.0, false); // CSF
            cv.ellipse(0.0, 0.0, 63.0 * s, 83.0 * s, 38.0, false); // grey matter
            cv.ellipse(0.0, 2.0, 50.0 * s, 68.0 * s, 28.0, false); // white matter
            cv.ellipse(-9.0, -8.0, 5.0, 22.0 * s, 6.0, false); // ventricles
            cv.ellipse(9.0, -8.0, 5.0, 22.0 * s, 6.0, false);
        }
        Region::Chest => {
            cv.ellipse(0.0, 10.0, 165.0 * s, 115.0, -100.0, false); // subcutaneous fat
            cv.ellipse(0.0, 10.0, 150.0 * s, 102.0, 45.0, false); // muscle
            cv.ellipse(-70.0 * s, 0.0, 60.0 * s, 80.0, -840.0, false); // right lung
            cv.ellipse(75.0 * s, 0.0, 55.0 * s, 78.0, -840.0, false); // left lung
            for i in 0..8 {
                // ribs around the thorax wall, front and back
                let t = std::f64::consts::PI * (0.12 + 0.11 * f64::from(i));
                for side in [-1.0, 1.0] {
                    for (fb, ry) in [(-1.0, 92.0), (1.0, 88.0)] {
                        cv.ellipse(
                            side * 141.0 * s * t.cos(),
                            10.0 + fb * ry * t.sin(),
                            6.0,
                            5.0,
                            800.0,
                            false,
                        );
                    }
                }
            }
            cv.ellipse(18.0, 15.0, 52.0 * s, 45.0, 42.0, false); // heart
            cv.ellipse(-20.0, 45.0, 13.0, 13.0, 190.0, false); // descending aorta (contrast)
            cv.ellipse(-5.0, -35.0, 11.0, 11.0, 190.0, false); // ascending aorta
            cv.ellipse(0.0, 75.0, 18.0, 16.0, 420.0, false); // vertebral body
            cv.ellipse(0.0, 97.0, 9.0, 8.0, 25.0, false); // spinal canal
            for (x, y) in [(-90.0, -15.0), (85.0, 20.0), (-60.0, 30.0)] {
                cv.ellipse(x * s, y, 3.0, 3.0, 60.0, false); // vessels in the lungs
            }
        }
        Region::Abdomen => {
            cv.ellipse(0.0, 10.0, 160.0 * s, 120.0, -100.0, false);
            cv.ellipse(0.0, 10.0, 145.0 * s, 105.0, 40.0, false);
            cv.ellipse(-60.0, -5.0, 75.0 * s, 62.0, 62.0, false); // liver
            cv.ellipse(80.0, 10.0, 30.0, 45.0 * s, 50.0, false); // spleen
            cv.ellipse(-70.0, 55.0, 24.0, 30.0, 160.0, false); // kidneys (enhancing)
            cv.ellipse(70.0, 55.0, 24.0, 30.0, 160.0, false);
            cv.ellipse(25.0, -25.0, 30.0 * s, 22.0, -700.0, false); // bowel gas
            cv.ellipse(-15.0, 40.0, 12.0, 12.0, 180.0, false); // aorta
            cv.ellipse(12.0, 42.0, 10.0, 13.0, 150.0, false); // IVC
            cv.ellipse(0.0, 75.0, 20.0, 18.0, 380.0, false); // vertebral body
            cv.ellipse(0.0, 98.0, 9.0, 8.0, 25.0, false);
        }
    }
    let radius = spacing * n as f64 / 2.0;
    let mid = (n as f64 - 1.0) / 2.0;
    let mut out = Vec::with_capacity(n * n);
    for (i, hu) in cv.data.iter().enumerate() {
        let x = (i % n) as f64 - mid;
        let y = (i / n) as f64 - mid;
        if (x * x + y * y).sqrt() * spacing > radius {
            out.push(0); // outside the reconstruction circle
            continue;
        }
        let v = hu + rng.gauss() * 10.0 + 1024.0;
        out.push(v.round().clamp(0.0, 4095.0) as u16);
    }
    out
}

/// MR contrast weighting of a brain slice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MrWeighting {
    T1,
    T2,
    Flair,
}

/// One axial brain MR slice (12 bits unsigned) with the given contrast and
/// Rician-like noise.
pub(crate) fn mr_slice(
    n: usize,
    spacing: f64,
    z: f64,
    weighting: MrWeighting,
    rng: &mut Rng,
) -> Vec<u16> {
    // scalp fat, skull, CSF, grey matter, white matter, ventricles, basal ganglia
    let [fat, bone, csf, gm, wm, vent, bg] = match weighting {
        MrWeighting::T1 => [1300.0, 60.0, 250.0, 700.0, 950.0, 230.0, 800.0],
        MrWeighting::T2 => [700.0, 60.0, 1500.0, 900.0, 620.0, 1550.0, 780.0],
        MrWeighting::Flair => [900.0, 60.0, 120.0, 950.0, 700.0, 100.0, 850.0],
    };
    let mut cv = Canvas::new(n, n, spacing, 0.0);
    let s = (1.0 - (z / 90.0).powi(2)).max(0.2).sqrt();
    cv.ellipse(0.0, 0.0, 80.0 * s, 100.0 * s, fat, false);
    cv.ellipse(0.0, 0.0, 74.0 * s, 94.0 * s, bone, false);
    cv.ellipse(0.0, 0.0, 68.0 * s, 88.0 * s, csf, false);
    cv.ellipse(0.0, 0.0, 65.0 * s, 85.0 * s, gm, false);
    cv.ellipse(0.0, 3.0, 52.0 * s, 70.0 * s, wm, false);
    if z.abs() < 35.0 {
        cv.ellipse(-9.0, -5.0, 5.0, 24.0 * s, vent, false); // lateral ventricles
        cv.ellipse(9.0, -5.0, 5.0, 24.0 * s, vent, false);
    }
    cv.ellipse(-20.0, 10.0, 8.0, 8.0, bg, false);
    cv.ellipse(20.0, 10.0, 8.0, 8.0, bg, false);
    cv.data
        .iter()
        .map(|v| {
            let noisy = ((v + rng.gauss() * 12.0).powi(2) + (rng.gauss() * 12.0).powi(2)).sqrt();
            noisy.round().clamp(0.0, 4095.0) as u16
        })
        .collect()
}

/// A PA chest radiograph as "brightness" (12 bits, MONOCHROME2 sense:
/// bone bright, lungs dark, direct exposure darkest).
pub(crate) fn chest_radiograph(rows: usize, cols: usize, rng: &mut Rng) -> Vec<u16> {
    // work in a nominal 430 mm x 430 mm field regardless of matrix
    let spacing = 430.0 / rows.max(cols) as f64;
    let mut cv = Canvas::new(rows, cols, spacing, 250.0);
    cv.ellipse(0.0, 40.0, 185.0, 260.0, 1500.0, false); // soft tissue of the trunk
    cv.ellipse(-160.0, -150.0, 45.0, 90.0, 1700.0, false); // shoulders
    cv.ellipse(160.0, -150.0, 45.0, 90.0, 1700.0, false);
    cv.ellipse(-80.0, 0.0, 70.0, 140.0, 700.0, false); // lungs
    cv.ellipse(80.0, 5.0, 68.0, 135.0, 700.0, false);
    for i in 0..10 {
        // ribs: arcs of large ellipses, curving down towards the sides
        let y = -150.0 + 27.0 * f64::from(i);
        for side in [-1.0, 1.0] {
            cv.arc(side * 20.0, y + 90.0, 140.0, 100.0, 9.0, 330.0, side);
        }
    }
    cv.ellipse(25.0, 60.0, 80.0, 70.0, 1950.0, false); // heart shadow
    cv.ellipse(0.0, -60.0, 22.0, 90.0, 2000.0, false); // mediastinum
    cv.ellipse(0.0, 20.0, 14.0, 240.0, 600.0, true); // spine
    cv.ellipse(-70.0, -150.0, 70.0, 6.0, 500.0, true); // clavicles
    cv.ellipse(70.0, -150.0, 70.0, 6.0, 500.0, true);
    cv.data
        .iter()
        .map(|v| (v + rng.gauss() * 25.0).round().clamp(0.0, 4095.0) as u16)
        .collect()
}

/// Frames of an abdominal ultrasound sector, RGB interleaved (R, G, B per
/// pixel), with a pulsating vessel and a small colour-flow box.
pub(crate) fn us_frames(rows: usize, cols: usize, frames: usize, rng: &mut Rng) -> Vec<Vec<u8>> {
    let apex_x = cols as f64 / 2.0;
    let apex_y = 8.0;
    let depth = rows as f64 - 14.0;
    let half_angle = 0.62_f64;
    // speckle texture fixed across frames, as in a real cine loop
    let speckle: Vec<f64> = (0..rows * cols).map(|_| rng.unit()).collect();
    (0..frames)
        .map(|f| {
            let phase = (f as f64 / frames as f64) * std::f64::consts::TAU;
            let vessel_r = 16.0 + 4.0 * phase.sin();
            let mut out = vec![0u8; rows * cols * 3];
            for r in 0..rows {
                for c in 0..cols {
                    let dx = c as f64 - apex_x;
                    let dy = r as f64 - apex_y;
                    let rad = (dx * dx + dy * dy).sqrt();
                    let ang = dx.atan2(dy);
                    let i = (r * cols + c) * 3;
                    if rad > depth || ang.abs() > half_angle || dy < 0.0 {
                        continue;
                    }
                    // echogenicity: liver-like parenchyma, a bright capsule line
                    let mut e = 0.45 - 0.25 * (rad / depth);
                    if (rad - 60.0).abs() < 2.0 {
                        e = 0.9;
                    }
                    let vx = dx - 25.0;
                    let vy = dy - 140.0;
                    let in_vessel = vx * vx + vy * vy < vessel_r * vessel_r;
                    if in_vessel {
                        e = 0.03;
                    }
                    let g = (255.0 * e * (0.4 + 1.2 * speckle[r * cols + c]))
                        .round()
                        .clamp(0.0, 255.0) as u8;
                    let mut px = [g, g, g];
                    // colour Doppler: red towards the probe, blue away
                    if in_vessel && vx.abs() < vessel_r * 0.8 {
                        let flow = (phase + vy / 10.0).sin();
                        px = if flow > 0.0 {
                            [(120.0 + 135.0 * flow) as u8, 20, 10]
                        } else {
                            [10, 30, (120.0 - 135.0 * flow) as u8]
                        };
                    }
                    out[i..i + 3].copy_from_slice(&px);
                }
            }
            // a small yellow depth scale on the right edge (burned-in graphics)
            for r in (apex_y as usize..rows - 10).step_by(20) {
                for c in cols - 12..cols - 6 {
                    let i = (r * cols + c) * 3;
                    out[i..i + 3].copy_from_slice(&[230, 200, 40]);
                }
            }
            out
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ct_values_cover_air_to_bone() {
        let mut rng = Rng::new(1);
        let px = ct_slice(128, 360.0 / 128.0, 0.0, Region::Chest, &mut rng);
        assert_eq!(px.len(), 128 * 128);
        let max = *px.iter().max().unwrap();
        let min = *px.iter().min().unwrap();
        assert!(min < 100, "air present");
        assert!(max > 1024 + 300, "bone present");
        assert!(max <= 4095);
    }

    #[test]
    fn us_frames_are_rgb() {
        let mut rng = Rng::new(2);
        let f = us_frames(60, 80, 2, &mut rng);
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].len(), 60 * 80 * 3);
    }
}
