//! Reading and writing `.npy` files row by row.
//!
//! Sources read rows on demand (seek + read), so an array far larger than memory can be
//! streamed through a pipeline. The writer streams rows too: it reserves a fixed-size header,
//! appends rows, and rewrites the header with the final row count when it finishes.
//! Supported element types: little-endian `f4`, `f8` (read as f32), `i4`, `i8`, `u1` (read as
//! i64, or as f32 where a float field is wanted). C order only.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use latentflow_engine::{DType, Tensor};
use ndarray::{ArrayD, IxDyn};

/// Element type on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    /// `<f4`
    F4,
    /// `<f8`
    F8,
    /// `<i4`
    I4,
    /// `<i8`
    I8,
    /// `|u1`
    U1,
}

impl Elem {
    fn size(self) -> usize {
        match self {
            Elem::F4 | Elem::I4 => 4,
            Elem::F8 | Elem::I8 => 8,
            Elem::U1 => 1,
        }
    }

    /// The tensor type rows are read as.
    pub fn dtype(self) -> DType {
        match self {
            Elem::F4 | Elem::F8 => DType::F32,
            Elem::I4 | Elem::I8 | Elem::U1 => DType::I64,
        }
    }
}

/// An open `.npy` file.
#[derive(Debug)]
pub struct NpyFile {
    path: PathBuf,
    file: File,
    /// Element type.
    pub elem: Elem,
    /// Full shape; the first axis is the row axis.
    pub shape: Vec<usize>,
    data_offset: u64,
}

fn header_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header.find(&format!("'{key}'"))?;
    let rest = header[at + key.len() + 2..]
        .trim_start()
        .strip_prefix(':')?
        .trim_start();
    Some(rest)
}

impl NpyFile {
    /// Opens a file and parses its header.
    pub fn open(path: &Path) -> Result<Self, String> {
        let bad = |m: &str| format!("{}: {m}", path.display());
        let mut file = File::open(path).map_err(|e| bad(&format!("cannot open: {e}")))?;
        let mut magic = [0u8; 8];
        file.read_exact(&mut magic)
            .map_err(|_| bad("too short to be a .npy file"))?;
        if &magic[..6] != b"\x93NUMPY" {
            return Err(bad("not a .npy file (bad magic bytes)"));
        }
        let header_len = match magic[6] {
            1 => {
                let mut b = [0u8; 2];
                file.read_exact(&mut b)
                    .map_err(|_| bad("truncated header"))?;
                u16::from_le_bytes(b) as usize
            }
            2 | 3 => {
                let mut b = [0u8; 4];
                file.read_exact(&mut b)
                    .map_err(|_| bad("truncated header"))?;
                u32::from_le_bytes(b) as usize
            }
            v => return Err(bad(&format!("unsupported .npy version {v}"))),
        };
        if header_len > 1 << 20 {
            return Err(bad("header too large"));
        }
        let mut h = vec![0u8; header_len];
        file.read_exact(&mut h)
            .map_err(|_| bad("truncated header"))?;
        let header = String::from_utf8_lossy(&h).to_string();
        let descr = header_value(&header, "descr")
            .and_then(|r| r.strip_prefix('\''))
            .and_then(|r| r.split('\'').next())
            .ok_or_else(|| bad("header has no `descr`"))?;
        let elem = match descr {
            "<f4" => Elem::F4,
            "<f8" => Elem::F8,
            "<i4" => Elem::I4,
            "<i8" => Elem::I8,
            "|u1" | "<u1" => Elem::U1,
            other => {
                return Err(bad(&format!(
                    "element type `{other}` is not supported (use float32, float64, int32, int64 or uint8, little-endian)"
                )))
            }
        };
        let fortran = header_value(&header, "fortran_order")
            .ok_or_else(|| bad("header has no `fortran_order`"))?;
        if fortran.starts_with("True") {
            return Err(bad(
                "Fortran-ordered arrays are not supported; save with np.ascontiguousarray",
            ));
        }
        let shape_text = header_value(&header, "shape")
            .and_then(|r| r.strip_prefix('('))
            .and_then(|r| r.split(')').next())
            .ok_or_else(|| bad("header has no `shape`"))?;
        let shape = shape_text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<usize>()
                    .map_err(|_| bad(&format!("bad shape entry `{s}`")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if shape.is_empty() {
            return Err(bad("a 0-dimensional array has no rows"));
        }
        let data_offset = file.stream_position().map_err(|e| bad(&e.to_string()))?;
        // Checked: a corrupt header may promise more bytes than memory can count. The
        // product of the non-zero axis lengths must fit an isize too (ndarray's rule for a
        // shape, empty axes included), for the whole array and for one row.
        let bytes = |dims: &[usize]| {
            let nonzero = dims
                .iter()
                .filter(|&&d| d != 0)
                .try_fold(elem.size(), |acc, &d| acc.checked_mul(d))?;
            isize::try_from(nonzero).ok()?;
            Some(if dims.contains(&0) { 0 } else { nonzero as u64 })
        };
        let expected = bytes(&shape)
            .zip(bytes(&shape[1..]))
            .and_then(|(b, _)| b.checked_add(data_offset))
            .ok_or_else(|| bad(&format!("the shape {shape:?} is too large")))?;
        let len = file.metadata().map_err(|e| bad(&e.to_string()))?.len();
        if len < expected {
            return Err(bad(&format!(
                "truncated: the header promises {expected} bytes, the file has {len}"
            )));
        }
        Ok(NpyFile {
            path: path.to_path_buf(),
            file,
            elem,
            shape,
            data_offset,
        })
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.shape[0]
    }

    /// Shape of one row.
    pub fn row_shape(&self) -> &[usize] {
        &self.shape[1..]
    }

    fn read_raw(&mut self, row: usize) -> Result<Vec<u8>, String> {
        let per_row: usize = self.row_shape().iter().product::<usize>() * self.elem.size();
        let off = self.data_offset + (row * per_row) as u64;
        let mut buf = vec![0u8; per_row];
        self.file
            .seek(SeekFrom::Start(off))
            .and_then(|_| self.file.read_exact(&mut buf))
            .map_err(|e| format!("{}: cannot read row {row}: {e}", self.path.display()))?;
        Ok(buf)
    }

    /// Reads one row as a tensor of the wanted element type.
    pub fn read_row(&mut self, row: usize, want: DType) -> Result<Tensor, String> {
        let raw = self.read_raw(row)?;
        let shape = IxDyn(self.row_shape());
        let values_f64: Vec<f64> = match self.elem {
            Elem::F4 => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            Elem::F8 => raw
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Elem::I4 => raw
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            Elem::I8 => {
                if want == DType::I64 {
                    let v: Vec<i64> = raw
                        .chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                        .collect();
                    return Ok(Tensor::i64(
                        ArrayD::from_shape_vec(shape, v).expect("row shape"),
                    ));
                }
                raw.chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect()
            }
            Elem::U1 => raw.iter().map(|&b| b as f64).collect(),
        };
        Ok(match want {
            DType::F32 => {
                let v: Vec<f32> = values_f64.into_iter().map(|x| x as f32).collect();
                Tensor::f32(ArrayD::from_shape_vec(shape, v).expect("row shape"))
            }
            DType::I64 => {
                let v: Vec<i64> = values_f64.into_iter().map(|x| x as i64).collect();
                Tensor::i64(ArrayD::from_shape_vec(shape, v).expect("row shape"))
            }
        })
    }

    /// Reads the whole array as one tensor of the wanted element type.
    pub fn read_all(&mut self, want: DType) -> Result<Tensor, String> {
        // Rows without elements add nothing; a header may still promise billions of them.
        let rows = if self.row_shape().contains(&0) {
            0
        } else {
            self.rows()
        };
        let mut f = Vec::new();
        let mut i = Vec::new();
        for r in 0..rows {
            match self.read_row(r, want)? {
                Tensor::F32(a) => f.extend(a.iter().copied()),
                Tensor::I64(a) => i.extend(a.iter().copied()),
            }
        }
        let shape = IxDyn(&self.shape);
        Ok(match want {
            DType::F32 => Tensor::f32(ArrayD::from_shape_vec(shape, f).map_err(|e| e.to_string())?),
            DType::I64 => Tensor::i64(ArrayD::from_shape_vec(shape, i).map_err(|e| e.to_string())?),
        })
    }
}

const HEADER_BYTES: usize = 256;

/// Streams rows into a `.npy` file.
pub struct NpyWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    dtype: DType,
    row_shape: Vec<usize>,
    rows: usize,
}

fn header(dtype: DType, shape: &[usize]) -> Vec<u8> {
    let descr = match dtype {
        DType::F32 => "<f4",
        DType::I64 => "<i8",
    };
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_s = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_s}, }}");
    let mut h = Vec::with_capacity(HEADER_BYTES);
    h.extend_from_slice(b"\x93NUMPY\x01\x00");
    let body_len = HEADER_BYTES - 10;
    h.extend_from_slice(&(body_len as u16).to_le_bytes());
    h.extend_from_slice(dict.as_bytes());
    while h.len() < HEADER_BYTES - 1 {
        h.push(b' ');
    }
    h.push(b'\n');
    h
}

impl NpyWriter {
    /// Starts a file whose rows have `row_shape`; it appears at `path` only on `finish`.
    pub fn create(path: &Path, dtype: DType, row_shape: &[usize]) -> Result<Self, String> {
        let tmp = path.with_extension("npy.partial");
        let file =
            File::create(&tmp).map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
        let mut out = BufWriter::new(file);
        out.write_all(&header(dtype, &[0]))
            .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        Ok(NpyWriter {
            path: path.to_path_buf(),
            tmp,
            out,
            dtype,
            row_shape: row_shape.to_vec(),
            rows: 0,
        })
    }

    /// Appends one row; its type and shape must match the first row's.
    pub fn write_row(&mut self, t: &Tensor) -> Result<(), String> {
        if t.dtype() != self.dtype || t.shape() != self.row_shape.as_slice() {
            return Err(format!(
                "row is {}{:?}, but {} holds {}{:?} rows",
                t.dtype(),
                t.shape(),
                self.path.display(),
                self.dtype,
                self.row_shape
            ));
        }
        let res = match t {
            Tensor::F32(a) => a
                .iter()
                .try_for_each(|v| self.out.write_all(&v.to_le_bytes())),
            Tensor::I64(a) => a
                .iter()
                .try_for_each(|v| self.out.write_all(&v.to_le_bytes())),
        };
        res.map_err(|e| format!("cannot write {}: {e}", self.tmp.display()))?;
        self.rows += 1;
        Ok(())
    }

    /// Writes the final header and moves the file into place.
    pub fn finish(mut self) -> Result<PathBuf, String> {
        let err = |e: std::io::Error| format!("cannot finish {}: {e}", self.tmp.display());
        self.out.flush().map_err(err)?;
        let mut shape = vec![self.rows];
        shape.extend_from_slice(&self.row_shape);
        let mut file = self.out.into_inner().map_err(|e| e.to_string())?;
        file.seek(SeekFrom::Start(0)).map_err(err)?;
        file.write_all(&header(self.dtype, &shape)).map_err(err)?;
        file.sync_all().map_err(err)?;
        std::fs::rename(&self.tmp, &self.path).map_err(err)?;
        Ok(self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_rows() {
        let dir = std::env::temp_dir().join(format!("lf-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.npy");
        let mut w = NpyWriter::create(&p, DType::F32, &[2, 3]).unwrap();
        for i in 0..5 {
            let a = ArrayD::from_shape_fn(IxDyn(&[2, 3]), |ix| (i * 6 + ix[0] * 3 + ix[1]) as f32);
            w.write_row(&Tensor::f32(a)).unwrap();
        }
        let bad = Tensor::f32(ArrayD::zeros(IxDyn(&[3])));
        assert!(w.write_row(&bad).unwrap_err().contains("holds f32[2, 3]"));
        w.finish().unwrap();
        let mut r = NpyFile::open(&p).unwrap();
        assert_eq!(r.shape, vec![5, 2, 3]);
        let row = r.read_row(3, DType::F32).unwrap();
        assert_eq!(row.as_f32().unwrap()[[1, 2]], 23.0);
        std::fs::write(dir.join("t.npy"), &std::fs::read(&p).unwrap()[..300]).unwrap();
        assert!(NpyFile::open(&dir.join("t.npy"))
            .unwrap_err()
            .contains("truncated"));
        std::fs::write(dir.join("x.npy"), b"hello").unwrap();
        assert!(NpyFile::open(&dir.join("x.npy")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Found by fuzzing (fuzz/README.md): shapes whose size overflows, and billions of empty
    /// rows, are errors or read at once, not panics or endless loops.
    #[test]
    fn corrupt_shapes_are_errors() {
        let dir = std::env::temp_dir().join(format!("lf-npy-shapes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.npy");
        let write = |shape: &str| {
            let mut dict =
                format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
            while (dict.len() + 11) % 64 != 0 {
                dict.push(' ');
            }
            dict.push('\n');
            let mut b = b"\x93NUMPY\x01\x00".to_vec();
            b.extend_from_slice(&(dict.len() as u16).to_le_bytes());
            b.extend_from_slice(dict.as_bytes());
            b.extend_from_slice(&[0; 64]);
            std::fs::write(&p, b).unwrap();
        };
        for shape in [
            "(4294967296, 4294967296, 2)",
            "(4611686018427387904,)",
            "(0, 4294967296, 4294967296)",
        ] {
            write(shape);
            let e = NpyFile::open(&p).unwrap_err();
            assert!(e.contains("too large"), "{shape}: {e}");
        }
        for shape in [
            "(18446744073709551615, 0)",
            "(18446744073709551615, 18446744073709551615, 0)",
        ] {
            write(shape);
            let e = NpyFile::open(&p).unwrap_err();
            assert!(e.contains("too large"), "{shape}: {e}");
        }
        write("(1099511627776, 0)");
        let mut f = NpyFile::open(&p).unwrap();
        assert_eq!(f.rows(), 1 << 40);
        assert_eq!(f.read_row(5, DType::F32).unwrap().shape(), &[0]);
        assert_eq!(f.read_all(DType::I64).unwrap().shape(), &[1 << 40, 0]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
