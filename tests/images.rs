//! Image folders in, PNG files and contact sheets out.

mod common;

use common::{latentflow, read_npy, scratch, text, write_pipeline};
use image::{Rgb, RgbImage};

#[test]
fn image_folders_become_tensors_and_tensors_become_pngs_and_grids() {
    let dir = scratch("images");
    let faces = dir.join("faces");
    std::fs::create_dir_all(&faces).unwrap();
    // Three 16x12 images of one colour each, a corrupt file, and a file that is not an image.
    let colours = [[255u8, 0, 0], [0, 255, 0], [10, 128, 250]];
    for (i, c) in colours.iter().enumerate() {
        RgbImage::from_pixel(16, 12, Rgb(*c))
            .save(faces.join(format!("face{i}.png")))
            .unwrap();
    }
    std::fs::write(faces.join("face3.png"), b"\x89PNG truncated").unwrap();
    std::fs::write(faces.join("notes.txt"), "skipped").unwrap();

    let yaml = format!(
        "name: images
sources:
  - name: faces
    kind: images
    params: {{path: {}, size: [8, 8], range: [-1, 1]}}
stages: []
sinks:
  - {{name: arrays, kind: npy, params: {{fields: [image]}}}}
  - {{name: files, kind: png, params: {{field: image, range: [-1, 1], dir: pngs}}}}
  - {{name: sheet, kind: grid, params: {{fields: [image, image], range: [-1, 1], scale: 2}}}}
",
        faces.display()
    );
    let file = write_pipeline(&dir, "images.yaml", &yaml);
    let out = dir.join("out");
    let o = latentflow(&[
        "run",
        file.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(3), "one record fails\n{}", text(&o));
    let errors = std::fs::read_to_string(out.join("errors.jsonl")).unwrap();
    assert_eq!(errors.lines().count(), 1, "{errors}");
    assert!(errors.contains("face3.png"), "{errors}");

    // Pixels map linearly onto [-1, 1], channel first.
    let (shape, values) = read_npy(&out.join("image.npy"));
    assert_eq!(shape, [3, 3, 8, 8]);
    for (i, c) in colours.iter().enumerate() {
        for ch in 0..3 {
            let v = values[i * 192 + ch * 64 + 27];
            let want = -1.0 + 2.0 * c[ch] as f64 / 255.0;
            assert!(
                (v - want).abs() < 1e-6,
                "image {i} channel {ch}: {v} vs {want}"
            );
        }
    }
    // And back to the same 8-bit colours.
    for (i, c) in colours.iter().enumerate() {
        let png = image::open(out.join(format!("pngs/face{i}.png")))
            .unwrap()
            .to_rgb8();
        assert_eq!(png.dimensions(), (8, 8));
        assert_eq!(png.get_pixel(3, 4), &Rgb(*c));
    }
    // The contact sheet: 3 rows, 2 columns of 16x16 tiles with 2-pixel gutters.
    let sheet = image::open(out.join("grid.png")).unwrap().to_rgb8();
    assert_eq!(sheet.dimensions(), (2 * 18 + 2, 3 * 18 + 2));
    assert_eq!(
        sheet.get_pixel(2 + 18 + 5, 2 + 2 * 18 + 5),
        &Rgb(colours[2])
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_empty_or_missing_image_folder_is_a_validation_error() {
    let dir = scratch("images-missing");
    let yaml = "name: images
sources:
  - {name: faces, kind: images, params: {path: nowhere}}
stages: []
sinks:
  - {name: files, kind: png, params: {field: image}}
";
    let file = write_pipeline(&dir, "missing.yaml", yaml);
    let o = latentflow(&["validate", file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("missing.yaml:3:"), "{err}");
    assert!(err.contains("cannot list"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
