//! Invented people: Chinese names (pinyin and hanzi), birth dates, sexes and
//! resident ID numbers, plus a small civil-date type.
//!
//! Every person is drawn from the seeded stream; no list of real people is
//! involved. Resident IDs use the 18-character GB 11643 layout with a valid
//! ISO 7064 MOD 11-2 check digit, but region codes `43990x` (province 43,
//! prefecture 99) are not assigned, so no generated number belongs to anyone.

use crate::rng::Rng;

/// Family names: (pinyin, hanzi).
const FAMILY: &[(&str, &str)] = &[
    ("Wang", "王"),
    ("Li", "李"),
    ("Zhang", "张"),
    ("Liu", "刘"),
    ("Chen", "陈"),
    ("Yang", "杨"),
    ("Zhao", "赵"),
    ("Huang", "黄"),
    ("Zhou", "周"),
    ("Wu", "吴"),
    ("Xu", "徐"),
    ("Sun", "孙"),
    ("Hu", "胡"),
    ("Zhu", "朱"),
    ("Gao", "高"),
    ("Lin", "林"),
    ("He", "何"),
    ("Guo", "郭"),
    ("Ma", "马"),
    ("Luo", "罗"),
    ("Tang", "唐"),
    ("Deng", "邓"),
    ("Peng", "彭"),
    ("Xiao", "肖"),
];

/// Given-name syllables usable for anyone: (pinyin, hanzi).
const GIVEN_ANY: &[(&str, &str)] = &[
    ("xiao", "小"),
    ("ming", "明"),
    ("hua", "华"),
    ("wen", "文"),
    ("jing", "静"),
    ("ping", "平"),
    ("yu", "玉"),
    ("chun", "春"),
    ("qing", "清"),
    ("hai", "海"),
    ("jian", "建"),
    ("xin", "新"),
    ("zhi", "志"),
    ("lin", "林"),
    ("yun", "云"),
    ("an", "安"),
];

const GIVEN_M: &[(&str, &str)] = &[
    ("wei", "伟"),
    ("qiang", "强"),
    ("lei", "磊"),
    ("jun", "军"),
    ("yong", "勇"),
    ("jie", "杰"),
    ("tao", "涛"),
    ("chao", "超"),
    ("gang", "刚"),
    ("guo", "国"),
    ("feng", "峰"),
    ("bo", "波"),
    ("dong", "东"),
    ("hui", "辉"),
];

const GIVEN_F: &[(&str, &str)] = &[
    ("fang", "芳"),
    ("na", "娜"),
    ("min", "敏"),
    ("li", "丽"),
    ("yan", "艳"),
    ("juan", "娟"),
    ("xia", "霞"),
    ("ying", "英"),
    ("hong", "红"),
    ("lan", "兰"),
    ("mei", "梅"),
    ("xiu", "秀"),
    ("hui", "慧"),
    ("shu", "淑"),
];

/// Unassigned region codes (see module docs).
const REGIONS: &[&str] = &["439901", "439902", "439903", "439905"];

/// A proleptic Gregorian date.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Date {
    pub(crate) y: i32,
    pub(crate) m: u32,
    pub(crate) d: u32,
}

impl Date {
    pub(crate) const fn new(y: i32, m: u32, d: u32) -> Date {
        Date { y, m, d }
    }

    /// Days since 1970-01-01 (H. Hinnant's `days_from_civil`).
    pub(crate) fn to_days(self) -> i64 {
        let y = i64::from(self.y) - i64::from(self.m <= 2);
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let m = i64::from(self.m);
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(self.d) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    pub(crate) fn from_days(z: i64) -> Date {
        let z = z + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let y = yoe + era * 400;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        Date::new((y + i64::from(m <= 2)) as i32, m, d)
    }

    pub(crate) fn add_days(self, n: i64) -> Date {
        Date::from_days(self.to_days() + n)
    }

    /// DICOM DA form, `YYYYMMDD`.
    pub(crate) fn da(self) -> String {
        format!("{:04}{:02}{:02}", self.y, self.m, self.d)
    }

    /// Whole years from `self` to `on`.
    pub(crate) fn age_on(self, on: Date) -> u32 {
        let mut years = on.y - self.y;
        if (on.m, on.d) < (self.m, self.d) {
            years -= 1;
        }
        years.max(0) as u32
    }
}

/// Sex as recorded in Patient's Sex (0010,0040).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sex {
    Male,
    Female,
}

impl Sex {
    pub(crate) fn code(self) -> &'static str {
        match self {
            Sex::Male => "M",
            Sex::Female => "F",
        }
    }
}

/// An invented person.
#[derive(Clone, Debug)]
pub(crate) struct Person {
    pub(crate) family_py: String,
    pub(crate) given_py: String,
    pub(crate) family_zh: String,
    pub(crate) given_zh: String,
    pub(crate) sex: Sex,
    pub(crate) birth: Date,
    pub(crate) resident_id: String,
}

impl Person {
    /// Person Name with alphabetic and ideographic groups,
    /// e.g. `Wang^Xiaoming=王^小明`.
    pub(crate) fn pn(&self) -> String {
        format!(
            "{}^{}={}^{}",
            self.family_py, self.given_py, self.family_zh, self.given_zh
        )
    }

    /// A name in pinyin only (for the PDF, which has no CJK font).
    pub(crate) fn latin(&self) -> String {
        format!("{} {}", self.family_py.to_uppercase(), self.given_py)
    }

    pub(crate) fn draw(rng: &mut Rng, birth_from: Date, birth_to: Date) -> Person {
        let sex = if rng.chance(0.5) {
            Sex::Male
        } else {
            Sex::Female
        };
        let (family_py, family_zh) = *rng.pick(FAMILY);
        let gendered = match sex {
            Sex::Male => GIVEN_M,
            Sex::Female => GIVEN_F,
        };
        let mut given_py = String::new();
        let mut given_zh = String::new();
        if rng.chance(0.7) {
            let (p, h) = *rng.pick(GIVEN_ANY);
            given_py.push_str(p);
            given_zh.push_str(h);
        }
        let (p, h) = *rng.pick(gendered);
        given_py.push_str(p);
        given_zh.push_str(h);
        let given_py = capitalize(&given_py);
        let span = birth_to.to_days() - birth_from.to_days();
        let birth = birth_from.add_days(rng.range(0, span));
        let resident_id = resident_id(rng, birth, sex);
        Person {
            family_py: family_py.to_string(),
            given_py,
            family_zh: family_zh.to_string(),
            given_zh,
            sex,
            birth,
            resident_id,
        }
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_ascii_uppercase().to_string() + c.as_str(),
        None => String::new(),
    }
}

/// An 18-character resident ID: region, birth date, sequence (odd for men,
/// even for women), ISO 7064 MOD 11-2 check character.
pub(crate) fn resident_id(rng: &mut Rng, birth: Date, sex: Sex) -> String {
    let region = rng.pick(REGIONS);
    let mut seq = rng.range(0, 998) as u32;
    let want_odd = sex == Sex::Male;
    if (seq % 2 == 1) != want_odd {
        seq += 1;
    }
    let body = format!("{region}{}{seq:03}", birth.da());
    let check = check_char(&body);
    format!("{body}{check}")
}

/// ISO 7064 MOD 11-2 check character over 17 digits.
pub(crate) fn check_char(body17: &str) -> char {
    const W: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    const MAP: &[u8; 11] = b"10X98765432";
    let sum: u32 = body17
        .bytes()
        .zip(W)
        .map(|(b, w)| u32::from(b - b'0') * w)
        .sum();
    MAP[(sum % 11) as usize] as char
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_round_trip() {
        for d in [
            Date::new(1970, 1, 1),
            Date::new(2000, 2, 29),
            Date::new(2024, 12, 31),
            Date::new(1931, 7, 4),
        ] {
            assert_eq!(Date::from_days(d.to_days()), d);
        }
        assert_eq!(Date::new(1970, 1, 1).to_days(), 0);
        assert_eq!(Date::new(2024, 3, 1).add_days(-1), Date::new(2024, 2, 29));
        assert_eq!(Date::new(1980, 6, 15).age_on(Date::new(2025, 6, 14)), 44);
    }

    #[test]
    fn check_digit_known_example() {
        // the worked example from GB 11643-1999
        assert_eq!(check_char("11010519491231002"), 'X');
    }

    #[test]
    fn resident_ids_are_well_formed() {
        let mut rng = Rng::new(3);
        for _ in 0..50 {
            let p = Person::draw(&mut rng, Date::new(1940, 1, 1), Date::new(2010, 1, 1));
            assert_eq!(p.resident_id.len(), 18);
            assert_eq!(&p.resident_id[6..14], p.birth.da());
            let seq: u32 = p.resident_id[14..17].parse().unwrap();
            assert_eq!(seq % 2 == 1, p.sex == Sex::Male);
            assert_eq!(
                p.resident_id.chars().last().unwrap(),
                check_char(&p.resident_id[..17])
            );
        }
    }
}
