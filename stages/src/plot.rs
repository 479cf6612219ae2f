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

/// 3×5 glyphs, one row per `u16` nibble-triplet: bit 14 is the top-left pixel. Lower-case
/// letters are drawn as capitals, but for `e`, the small exponent of tick labels.
pub(crate) fn glyph(c: char) -> Option<u16> {
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
        ' ' => 0,
        '_' => 0b000_000_000_000_111,
        '(' => 0b010_100_100_100_010,
        ')' => 0b010_001_001_001_010,
        '/' => 0b001_001_010_100_100,
        ':' => 0b000_010_000_010_000,
        '%' => 0b101_001_010_100_101,
        '=' => 0b000_111_000_111_000,
        ',' => 0b000_000_000_010_100,
        ';' => 0b000_010_000_010_100,
        '>' => 0b100_010_001_010_100,
        '\'' => 0b010_010_000_000_000,
        'A' => 0b010_101_111_101_101,
        'B' => 0b110_101_110_101_110,
        'C' => 0b011_100_100_100_011,
        'D' => 0b110_101_101_101_110,
        'E' => 0b111_100_110_100_111,
        'F' => 0b111_100_110_100_100,
        'G' => 0b011_100_101_101_011,
        'H' => 0b101_101_111_101_101,
        'I' => 0b111_010_010_010_111,
        'J' => 0b001_001_001_101_010,
        'K' => 0b101_101_110_101_101,
        'L' => 0b100_100_100_100_111,
        'M' => 0b101_111_111_101_101,
        'N' => 0b110_101_101_101_101,
        'O' => 0b010_101_101_101_010,
        'P' => 0b110_101_110_100_100,
        'Q' => 0b010_101_101_110_011,
        'R' => 0b110_101_110_101_101,
        'S' => 0b011_100_010_001_110,
        'T' => 0b111_010_010_010_010,
        'U' => 0b101_101_101_101_111,
        'V' => 0b101_101_101_101_010,
        'W' => 0b101_101_111_111_101,
        'X' => 0b101_101_010_101_101,
        'Y' => 0b101_101_010_010_010,
        'Z' => 0b111_001_010_100_111,
        // Lower case is drawn as upper case (`e` above is the exponent of tick labels).
        c if c.is_ascii_lowercase() => return glyph(c.to_ascii_uppercase()),
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

/// Axis titles and series names for [`labelled_chart`].
#[derive(Clone, Debug, Default)]
pub struct Labels {
    /// Title under the x axis.
    pub x: String,
    /// Title above the y axis.
    pub y: String,
    /// One name per series, in the legend right of the plot (empty: no legend).
    pub names: Vec<String>,
}

/// Margins around the plotting area.
struct Frame {
    w: u32,
    h: u32,
    left: u32,
    right: u32,
    top: u32,
    bottom: u32,
}

/// Renders the series on shared axes; `None` when there is nothing finite to draw.
pub fn line_chart(series: &[Series]) -> Option<RgbImage> {
    render(series, None)
}

/// [`line_chart`] with axis titles and a legend naming each series by its colour. Letters are
/// drawn in capitals.
pub fn labelled_chart(series: &[Series], labels: &Labels) -> Option<RgbImage> {
    render(series, Some(labels))
}

fn render(series: &[Series], labels: Option<&Labels>) -> Option<RgbImage> {
    let legend_w = labels
        .map(|l| l.names.iter().map(|n| text_width(n, 2)).max().unwrap_or(0))
        .filter(|&w| w > 0)
        .map_or(0, |w| w as u32 + 44);
    let titled = labels.is_some();
    let fr = Frame {
        w: W + legend_w,
        h: H + if titled { 28 } else { 0 },
        left: LEFT,
        right: RIGHT + legend_w,
        top: TOP + if titled { 14 } else { 0 },
        bottom: BOTTOM + if titled { 14 } else { 0 },
    };

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
    let (pw, ph) = (
        (fr.w - fr.left - fr.right) as f64,
        (fr.h - fr.top - fr.bottom) as f64,
    );
    let px = |x: f64| fr.left as f64 + (x - xs.0) / (xs.1 - xs.0) * pw;
    let py = |y: f64| fr.top as f64 + (1.0 - (y - ys.0) / (ys.1 - ys.0)) * ph;

    let mut img = RgbImage::from_pixel(fr.w, fr.h, Rgb([255, 255, 255]));
    let grey = Rgb([200, 200, 200]);
    let ink = Rgb([40, 40, 40]);
    // Grid lines and tick labels: 5 on each axis.
    for k in 0..=4 {
        let f = k as f64 / 4.0;
        let (yv, xv) = (ys.0 + f * (ys.1 - ys.0), xs.0 + f * (xs.1 - xs.0));
        let (y, x) = (py(yv).round() as i64, px(xv).round() as i64);
        for gx in fr.left as i64..(fr.w - fr.right) as i64 {
            put(&mut img, gx, y, grey);
        }
        for gy in fr.top as i64..(fr.h - fr.bottom) as i64 {
            put(&mut img, x, gy, grey);
        }
        let yl = tick_label(yv);
        draw_text(
            &mut img,
            &yl,
            fr.left as i64 - 6 - text_width(&yl, 2),
            y - 5,
            2,
            ink,
        );
        let xl = tick_label(xv);
        draw_text(
            &mut img,
            &xl,
            x - text_width(&xl, 2) / 2,
            (fr.h - fr.bottom) as i64 + 8,
            2,
            ink,
        );
    }
    // Axes.
    for gx in fr.left as i64..(fr.w - fr.right) as i64 {
        put(&mut img, gx, (fr.h - fr.bottom) as i64, ink);
    }
    for gy in fr.top as i64..=(fr.h - fr.bottom) as i64 {
        put(&mut img, fr.left as i64, gy, ink);
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
    if let Some(l) = labels {
        // Capitals: the lower-case `e` glyph is the exponent of tick labels.
        let (x_title, y_title) = (l.x.to_uppercase(), l.y.to_uppercase());
        draw_text(&mut img, &y_title, 8, 6, 2, ink);
        let xw = text_width(&x_title, 2);
        let xc = (fr.left + (fr.w - fr.left - fr.right) / 2) as i64;
        draw_text(&mut img, &x_title, xc - xw / 2, fr.h as i64 - 14, 2, ink);
        let x0 = (fr.w - fr.right) as i64 + 12;
        for (k, (name, s)) in l.names.iter().zip(series).enumerate() {
            let y = fr.top as i64 + 6 + k as i64 * 18;
            let c = s.colour;
            line(
                &mut img,
                (x0 as f64, y as f64 + 5.0),
                (x0 as f64 + 18.0, y as f64 + 5.0),
                c,
            );
            draw_text(&mut img, &name.to_uppercase(), x0 + 26, y, 2, ink);
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

    #[test]
    fn legends_name_each_series_beside_the_plot() {
        let series: Vec<Series> = (0..2)
            .map(|k| Series {
                points: (0..5).map(|i| (i as f64, (i * (k + 1)) as f64)).collect(),
                band: None,
                colour: PALETTE[k],
            })
            .collect();
        let labels = Labels {
            x: "labels used".into(),
            y: "test macro-F1 (mean)".into(),
            names: vec!["gcbr_pp".into(), "random".into()],
        };
        for text in [&labels.x, &labels.y, &labels.names[0]] {
            assert!(text.chars().all(|c| glyph(c).is_some()), "{text}");
        }
        let plain = line_chart(&series).unwrap();
        let img = labelled_chart(&series, &labels).unwrap();
        assert_eq!(plain.width(), W);
        assert!(img.width() > W && img.height() > H);
        // Each series' colour appears right of the plotting area (its legend swatch), in order
        // from the top; nothing is drawn there without a legend.
        let right = img.width() - RIGHT - (img.width() - W);
        let rows_of = |c: [u8; 3]| -> Vec<u32> {
            (0..img.height())
                .filter(|&y| (right + 4..img.width()).any(|x| img.get_pixel(x, y) == &Rgb(c)))
                .collect()
        };
        let (a, b) = (rows_of(PALETTE[0]), rows_of(PALETTE[1]));
        assert!(!a.is_empty() && !b.is_empty());
        assert!(a.iter().max() < b.iter().min());
        // Ink (the names' letters) beside the swatches.
        let ink = (right + 30..img.width())
            .flat_map(|x| (0..img.height()).map(move |y| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x, y) == &Rgb([40, 40, 40]))
            .count();
        assert!(ink > 50, "{ink}");
    }
}
