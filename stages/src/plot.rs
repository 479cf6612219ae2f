//! Line charts as PNG, with no font files: axes, tick labels in a built-in 3×5 pixel font,
//! lines, and shaded bands (mean ± standard deviation). Enough for learning curves and loss
//! curves that people look at rather than read; the numbers themselves go to JSON beside.

use image::{Rgb, RgbImage};

/// One line of a chart.
#[derive(Clone, Debug)]
pub struct Series {
    /// Points, in x order.
    pub points: Vec<(f64, f64)>,
    /// Half-width of a shaded band around each point (e.g. a standard deviation), if any.
    pub band: Option<Vec<f64>>,
    /// Line colour.
    pub colour: [u8; 3],
}

/// Colours for successive series (colour-blind-safe palette).
pub const PALETTE: [[u8; 3]; 6] = [
    [0, 114, 178],
    [213, 94, 0],
    [0, 158, 115],
    [204, 121, 167],
    [230, 159, 0],
    [86, 180, 233],
];

const W: u32 = 640;
const H: u32 = 400;
const LEFT: u32 = 56;
const RIGHT: u32 = 16;
const TOP: u32 = 16;
const BOTTOM: u32 = 32;

/// 3×5 glyphs, one row per `u16` nibble-triplet: bit 14 is the top-left pixel.
fn glyph(c: char) -> Option<u16> {
    Some(match c {
        '0' => 0b111_101_101_101_111,
        '1' => 0b010_110_010_010_111,
        '2' => 0b111_001_111_100_111,
        '3' => 0b111_001_111_001_111,
        '4' => 0b101_101_111_001_001,
        '5' => 0b111_100_111_001_111,
        '6' => 0b111_100_111_101_111,
        '7' => 0b111_001_010_010_010,
        '8' => 0b111_101_111_101_111,
        '9' => 0b111_101_111_001_111,
        '.' => 0b000_000_000_000_010,
        '-' => 0b000_000_111_000_000,
        'e' => 0b000_111_111_100_111,
        '+' => 0b000_010_111_010_000,
        _ => return None,
    })
}

/// Draws `text` with its top-left corner at (x, y), each font pixel `scale` pixels wide.
fn draw_text(img: &mut RgbImage, text: &str, x: i64, y: i64, scale: i64, colour: Rgb<u8>) {
    for (i, c) in text.chars().enumerate() {
        let Some(g) = glyph(c) else { continue };
        for row in 0..5 {
            for col in 0..3 {
                if g >> (14 - (row * 3 + col)) & 1 == 1 {
                    for dy in 0..scale {
                        for dx in 0..scale {
                            put(
                                img,
                                x + (i as i64 * 4 + col) * scale + dx,
                                y + row * scale + dy,
                                colour,
                            );
                        }
                    }
                }
            }
        }
    }
}

fn text_width(text: &str, scale: i64) -> i64 {
    text.chars().count() as i64 * 4 * scale - scale
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

fn blend(img: &mut RgbImage, x: i64, y: i64, c: [u8; 3], alpha: f32) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        let p = img.get_pixel_mut(x as u32, y as u32);
        for k in 0..3 {
            p[k] = (p[k] as f32 * (1.0 - alpha) + c[k] as f32 * alpha).round() as u8;
        }
    }
}

/// A thick line from (x0, y0) to (x1, y1).
fn line(img: &mut RgbImage, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3]) {
    let steps = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1) * 2;
    for s in 0..=steps {
        let t = s as f64 / steps as f64;
        let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
        for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
            put(
                img,
                x.round() as i64 + dx - 1,
                y.round() as i64 + dy - 1,
                Rgb(c),
            );
        }
    }
}

/// A short label for a tick value.
fn tick_label(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    } else {
        format!("{v:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    }
}

/// Renders the series on shared axes; `None` when there is nothing finite to draw.
pub fn line_chart(series: &[Series]) -> Option<RgbImage> {
    let mut xs = (f64::INFINITY, f64::NEG_INFINITY);
    let mut ys = (f64::INFINITY, f64::NEG_INFINITY);
    for s in series {
        for (i, &(x, y)) in s.points.iter().enumerate() {
            if !x.is_finite() || !y.is_finite() {
                continue;
            }
            let b = s
                .band
                .as_ref()
                .and_then(|b| b.get(i))
                .copied()
                .unwrap_or(0.0);
            xs = (xs.0.min(x), xs.1.max(x));
            ys = (ys.0.min(y - b), ys.1.max(y + b));
        }
    }
    if !xs.0.is_finite() || !ys.0.is_finite() {
        return None;
    }
    if xs.1 <= xs.0 {
        xs.1 = xs.0 + 1.0;
    }
    if ys.1 <= ys.0 {
        ys = (ys.0 - 0.5, ys.1 + 0.5);
    }
    let pad = (ys.1 - ys.0) * 0.05;
    ys = (ys.0 - pad, ys.1 + pad);
    let (pw, ph) = ((W - LEFT - RIGHT) as f64, (H - TOP - BOTTOM) as f64);
    let px = |x: f64| LEFT as f64 + (x - xs.0) / (xs.1 - xs.0) * pw;
    let py = |y: f64| TOP as f64 + (1.0 - (y - ys.0) / (ys.1 - ys.0)) * ph;

    let mut img = RgbImage::from_pixel(W, H, Rgb([255, 255, 255]));
    let grey = Rgb([200, 200, 200]);
    let ink = Rgb([40, 40, 40]);
    // Grid lines and tick labels: 5 on each axis.
    for k in 0..=4 {
        let f = k as f64 / 4.0;
        let (yv, xv) = (ys.0 + f * (ys.1 - ys.0), xs.0 + f * (xs.1 - xs.0));
        let (y, x) = (py(yv).round() as i64, px(xv).round() as i64);
        for gx in LEFT as i64..(W - RIGHT) as i64 {
            put(&mut img, gx, y, grey);
        }
        for gy in TOP as i64..(H - BOTTOM) as i64 {
            put(&mut img, x, gy, grey);
        }
        let yl = tick_label(yv);
        draw_text(
            &mut img,
            &yl,
            LEFT as i64 - 6 - text_width(&yl, 2),
            y - 5,
            2,
            ink,
        );
        let xl = tick_label(xv);
        draw_text(
            &mut img,
            &xl,
            x - text_width(&xl, 2) / 2,
            (H - BOTTOM) as i64 + 8,
            2,
            ink,
        );
    }
    // Axes.
    for gx in LEFT as i64..(W - RIGHT) as i64 {
        put(&mut img, gx, (H - BOTTOM) as i64, ink);
    }
    for gy in TOP as i64..=(H - BOTTOM) as i64 {
        put(&mut img, LEFT as i64, gy, ink);
    }
    // Bands, then lines on top.
    for s in series {
        let Some(band) = &s.band else { continue };
        for w in s.points.windows(2).zip(band.windows(2)) {
            let ((a, b), (ba, bb)) = ((w.0[0], w.0[1]), (w.1[0], w.1[1]));
            let (x0, x1) = (px(a.0).round() as i64, px(b.0).round() as i64);
            for x in x0..=x1.max(x0) {
                let t = if x1 > x0 {
                    (x - x0) as f64 / (x1 - x0) as f64
                } else {
                    0.0
                };
                let (m, h) = (a.1 + (b.1 - a.1) * t, ba + (bb - ba) * t);
                let (y0, y1) = (py(m + h).round() as i64, py(m - h).round() as i64);
                for y in y0..=y1 {
                    blend(&mut img, x, y, s.colour, 0.18);
                }
            }
        }
    }
    for s in series {
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&(x, y)| (px(x), py(y)))
            .collect();
        for w in pts.windows(2) {
            line(&mut img, w[0], w[1], s.colour);
        }
        if pts.len() == 1 {
            line(&mut img, pts[0], pts[0], s.colour);
        }
    }
    Some(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rising_line_goes_from_bottom_left_to_top_right() {
        let s = Series {
            points: (0..=10).map(|i| (i as f64, i as f64)).collect(),
            band: Some(vec![0.5; 11]),
            colour: PALETTE[0],
        };
        let img = line_chart(&[s]).unwrap();
        let c = Rgb(PALETTE[0]);
        let near = |x: u32, y: u32| {
            (x.saturating_sub(3)..x + 3)
                .any(|xx| (y.saturating_sub(3)..y + 3).any(|yy| img.get_pixel(xx, yy) == &c))
        };
        // The first point is at the left edge, low; the last at the right edge, high.
        let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
        let y_of = |v: f64| TOP + ((1.0 - (v + 1.05) / 12.1) * ph as f64).round() as u32;
        assert!(near(LEFT, y_of(0.0)));
        assert!(near(LEFT + pw, y_of(10.0)));
        assert!(!near(LEFT + pw, y_of(0.0)));
        assert!(line_chart(&[]).is_none());
    }

    #[test]
    fn tick_labels_are_short_and_drawable() {
        for v in [0.0, 0.125, 1.5, 250.0, 1e-5, -3.25, 123456.0] {
            let l = tick_label(v);
            assert!(l.len() <= 8, "{l}");
            assert!(l.chars().all(|c| glyph(c).is_some()), "{l}");
        }
    }
}
