//! Reads the whole log from an SQLite file through the C API, for `verify`.
//!
//! Why not sqlx: it duplicates every value (`sqlite3_value_dup`) and sends each row through a
//! channel, which caps a full scan at a few hundred thousand rows per second. Here one blocking
//! thread steps a read-only statement and copies the column bytes straight into the binary COPY
//! form that the hashing thread parses. The `unsafe` is confined to this file: a connection and a
//! statement owned by one thread, closed by `Drop`, slices read before the next step.

use std::{ffi::CString, os::unix::ffi::OsStrExt, path::Path, ptr};

use bytes::{BufMut, Bytes, BytesMut};
use libsqlite3_sys as ffi;
use tokio::sync::mpsc;

struct Db(*mut ffi::sqlite3);

impl Drop for Db {
    fn drop(&mut self) {
        // SAFETY: the handle came from sqlite3_open_v2 and is closed exactly once, after the
        // statement (declared later, so dropped first).
        unsafe { ffi::sqlite3_close(self.0) };
    }
}

struct Stmt(*mut ffi::sqlite3_stmt);

impl Drop for Stmt {
    fn drop(&mut self) {
        // SAFETY: the statement came from sqlite3_prepare_v2 (or is null, which is allowed).
        unsafe { ffi::sqlite3_finalize(self.0) };
    }
}

fn message(db: &Db) -> String {
    // SAFETY: sqlite3_errmsg returns a NUL-terminated string owned by the connection.
    unsafe { std::ffi::CStr::from_ptr(ffi::sqlite3_errmsg(db.0)).to_string_lossy().into_owned() }
}

/// Streams `sql` (`columns` columns: two integers, then text/blob) from the database file at `path`
/// as binary COPY tuples (after `header`) in chunks of about `chunk` bytes. Returns early without
/// error when the receiver hangs up.
pub(crate) fn scan(
    path: &Path,
    sql: &str,
    columns: i16,
    header: &[u8],
    chunk: usize,
    tx: mpsc::Sender<Bytes>,
) -> Result<(), String> {
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|_| "database path contains NUL".to_string())?;
    let c_sql = CString::new(sql).map_err(|_| "query contains NUL".to_string())?;
    let mut raw = ptr::null_mut();
    // SAFETY: valid C strings; `raw` receives a handle that `Db` closes even when opening fails.
    let rc = unsafe {
        ffi::sqlite3_open_v2(
            c_path.as_ptr(),
            &mut raw,
            ffi::SQLITE_OPEN_READONLY | ffi::SQLITE_OPEN_NOMUTEX,
            ptr::null(),
        )
    };
    let db = Db(raw);
    if rc != ffi::SQLITE_OK {
        return Err(format!("opening {}: {}", path.display(), message(&db)));
    }
    let mut raw_stmt = ptr::null_mut();
    // SAFETY: open connection, valid C string, out-pointer to a local.
    let rc = unsafe {
        ffi::sqlite3_busy_timeout(db.0, 10_000);
        ffi::sqlite3_prepare_v2(db.0, c_sql.as_ptr(), -1, &mut raw_stmt, ptr::null_mut())
    };
    let stmt = Stmt(raw_stmt);
    if rc != ffi::SQLITE_OK {
        return Err(message(&db));
    }
    let mut buf = BytesMut::with_capacity(chunk + 4096);
    buf.put_slice(header);
    loop {
        // SAFETY: prepared statement of this thread's connection.
        match unsafe { ffi::sqlite3_step(stmt.0) } {
            ffi::SQLITE_ROW => {
                buf.put_i16(columns);
                for i in 0..2 {
                    buf.put_i32(8);
                    // SAFETY: column index within the selected columns.
                    buf.put_i64(unsafe { ffi::sqlite3_column_int64(stmt.0, i) });
                }
                for i in 2..i32::from(columns) {
                    // SAFETY: the pointer and length describe the current row's value and stay
                    // valid until the next step; the bytes are copied before that.
                    unsafe {
                        if ffi::sqlite3_column_type(stmt.0, i) == ffi::SQLITE_NULL {
                            buf.put_i32(-1);
                            continue;
                        }
                        let p = ffi::sqlite3_column_blob(stmt.0, i) as *const u8;
                        let n = ffi::sqlite3_column_bytes(stmt.0, i).max(0);
                        buf.put_i32(n);
                        if n > 0 && !p.is_null() {
                            buf.put_slice(std::slice::from_raw_parts(p, n as usize));
                        }
                    }
                }
                if buf.len() >= chunk && tx.blocking_send(buf.split().freeze()).is_err() {
                    return Ok(());
                }
            }
            ffi::SQLITE_DONE => break,
            _ => return Err(message(&db)),
        }
    }
    buf.put_i16(-1);
    let _ = tx.blocking_send(buf.freeze());
    Ok(())
}
