"""POI and place names from category-dependent vocabularies, in English or Chinese.

ReFound reads POI *names* with its language expert (paper 4.1.1), so names must carry the
category signal the way real ones do ("Wang's Noodle House", "王记面馆") while varying in
owner, brand and place words. Every name is assembled from a per-category style and noun list;
all choices come from integer draws made by the caller's generator (one row per POI).
"""
from __future__ import annotations

import numpy as np

# (pinyin, hanzi) syllables for place names; a district is named by two of them.
SYLLABLES = (
    ("Bai", "白"), ("Shi", "石"), ("Shui", "水"), ("Wei", "围"), ("Tian", "田"), ("Gang", "岗"),
    ("Sha", "沙"), ("Tou", "头"), ("Lin", "林"), ("Hu", "湖"), ("Nan", "南"), ("Bei", "北"),
    ("Dong", "东"), ("Xi", "西"), ("Long", "龙"), ("Feng", "凤"), ("Fu", "福"), ("An", "安"),
    ("Ping", "平"), ("Kou", "口"), ("Tang", "塘"), ("He", "河"), ("Shan", "山"), ("Xin", "新"),
    ("Jing", "景"), ("Hua", "华"), ("Mei", "梅"), ("Yuan", "园"), ("Gu", "古"), ("Qiao", "桥"),
    ("Zhu", "竹"), ("Song", "松"), ("Yun", "云"), ("Cheng", "城"), ("Liu", "柳"), ("Tao", "桃"),
)

SURNAMES = (("Li", "李"), ("Wang", "王"), ("Zhang", "张"), ("Liu", "刘"), ("Chen", "陈"),
            ("Yang", "杨"), ("Huang", "黄"), ("Zhao", "赵"), ("Wu", "吴"), ("Zhou", "周"),
            ("Xu", "徐"), ("Sun", "孙"), ("Ma", "马"), ("Zhu", "朱"), ("Hu", "胡"), ("Guo", "郭"),
            ("He", "何"), ("Lin", "林"), ("Luo", "罗"), ("Zheng", "郑"))
ADJECTIVES = (("Golden", "金"), ("Lucky", "福"), ("Prosperous", "鑫"), ("Happy", "乐"),
              ("Old", "老"), ("New", "新"), ("Red", "红"), ("Jade", "玉"), ("Dragon", "龙"),
              ("Phoenix", "凤"), ("Harmony", "和"), ("Sunny", "阳光"), ("Spring", "春"),
              ("Star", "星"), ("Peace", "安"))
BRANDS = (("DailyGo", "每日优选"), ("CityFresh", "城鲜"), ("QuickMart", "快易购"),
          ("EasyLife", "易生活"), ("Sunrise", "朝阳"), ("GreenLeaf", "绿叶"), ("BlueSky", "蓝天"),
          ("HappyBee", "乐蜂"))
BANKS = (("Harbour Bank", "港湾银行"), ("Pearl River Bank", "珠江银行"), ("Union Bank", "联合银行"),
         ("Commerce Bank", "商业银行"))
ESTATE_ADJ = (("Harmony", "和谐"), ("Splendid", "锦绣"), ("Pearl", "明珠"), ("Jade", "翡翠"),
              ("Sunshine", "阳光"), ("Lakeview", "湖景"), ("Imperial", "御"), ("Riverside", "滨江"))
COMPANY = (("Hengda", "恒达"), ("Xinxing", "新兴"), ("Huamei", "华美"), ("Tianli", "天力"),
           ("Jinyuan", "金源"), ("Yongxin", "永信"), ("Dafeng", "大丰"), ("Ruitai", "瑞泰"))
INDUSTRY = (("Electronics", "电子"), ("Plastics", "塑胶"), ("Textile", "纺织"), ("Hardware", "五金"),
            ("Printing", "印刷"), ("Furniture", "家具"), ("Packaging", "包装"), ("Optics", "光学"))

# category -> (style, English nouns, Chinese nouns)
NOUNS = {
    "restaurant": ("shop", ["Restaurant", "Kitchen", "Canteen", "Seafood Restaurant", "Sichuan Restaurant",
                            "Hunan Kitchen", "Cantonese Restaurant", "Hotpot"],
                   ["饭店", "酒家", "餐厅", "海鲜酒楼", "川菜馆", "湘菜馆", "粤菜馆", "火锅"]),
    "fast_food": ("brand", ["Burgers", "Fried Chicken", "Fast Food", "Dumplings"], ["汉堡", "炸鸡", "快餐", "饺子馆"]),
    "noodle_shop": ("shop", ["Noodle House", "Beef Noodles", "Rice Noodles", "Lanzhou Noodles"],
                    ["面馆", "牛肉面", "米粉店", "兰州拉面"]),
    "street_food": ("shop", ["Snack Stall", "Barbecue", "Congee", "Steamed Buns", "Rice Rolls"],
                    ["小吃", "烧烤", "粥铺", "包子铺", "肠粉"]),
    "cafe": ("shop", ["Coffee", "Cafe", "Coffee House"], ["咖啡", "咖啡馆", "咖啡厅"]),
    "tea_house": ("shop", ["Tea House", "Tea Room", "Milk Tea"], ["茶馆", "茶楼", "奶茶"]),
    "bakery": ("shop", ["Bakery", "Cake Shop"], ["面包店", "蛋糕店"]),
    "bar": ("shop", ["Bar", "Pub", "Wine Bar"], ["酒吧", "小酒馆", "清吧"]),
    "convenience_store": ("brand", ["Convenience Store", "Mart"], ["便利店", "超市"]),
    "supermarket": ("brand", ["Supermarket", "Hypermarket"], ["超市", "大卖场"]),
    "shopping_mall": ("estate", ["Plaza", "Mall", "Shopping Center"], ["广场", "购物中心", "商场"]),
    "clothing_store": ("shop", ["Fashion", "Clothing", "Apparel"], ["服装店", "服饰", "时装"]),
    "boutique": ("shop", ["Boutique", "Design Studio", "Handicrafts"], ["精品店", "设计工作室", "手工艺品"]),
    "electronics_store": ("shop", ["Electronics", "Digital Store", "Appliances"], ["电器", "数码店", "家电"]),
    "phone_repair": ("shop", ["Phone Repair", "Mobile Repair", "Phone Accessories"], ["手机维修", "手机快修", "手机配件"]),
    "hardware_store": ("shop", ["Hardware", "Building Materials", "Tools"], ["五金店", "建材", "工具店"]),
    "pharmacy": ("brand", ["Pharmacy", "Drugstore"], ["大药房", "药店"]),
    "market": ("official", ["Market", "Wet Market", "Farmers Market"], ["市场", "菜市场", "农贸市场"]),
    "bookstore": ("shop", ["Bookstore", "Books"], ["书店", "书屋"]),
    "souvenir_shop": ("shop", ["Souvenirs", "Gift Shop", "Crafts"], ["纪念品", "礼品店", "工艺品"]),
    "hair_salon": ("shop", ["Hair Salon", "Barber", "Beauty Salon"], ["理发店", "发型设计", "美容美发"]),
    "laundry": ("shop", ["Laundry", "Dry Cleaning"], ["洗衣店", "干洗店"]),
    "bank": ("bank", ["Branch"], ["支行"]),
    "real_estate_agency": ("brand", ["Realty", "Property Agency", "Homes"], ["地产", "房产中介", "置业"]),
    "courier": ("brand", ["Express", "Courier", "Delivery Station"], ["快递", "速运", "快递驿站"]),
    "car_repair": ("shop", ["Auto Repair", "Car Service", "Tyres"], ["汽修", "汽车服务", "轮胎店"]),
    "print_shop": ("shop", ["Print Shop", "Copy Center"], ["图文快印", "打印复印"]),
    "internet_cafe": ("shop", ["Internet Cafe", "Net Bar", "Gaming Club"], ["网吧", "网咖", "电竞馆"]),
    "hotel": ("estate", ["Hotel", "Grand Hotel", "International Hotel"], ["酒店", "大酒店", "国际酒店"]),
    "hostel": ("shop", ["Hostel", "Youth Hostel", "Backpackers"], ["青年旅舍", "客栈", "驿站"]),
    "guesthouse": ("shop", ["Guesthouse", "Inn", "Homestay"], ["民宿", "客栈", "旅馆"]),
    "rental_apartment": ("rental", ["Apartments", "Rooms for Rent", "Rental Flats"], ["公寓", "出租屋", "租房"]),
    "residential_complex": ("estate", ["Garden", "Court", "Heights", "Residence", "Mansion"],
                            ["花园", "苑", "华庭", "公馆", "家园"]),
    "dormitory": ("company", ["Staff Dormitory", "Workers' Dormitory"], ["员工宿舍", "工人宿舍"]),
    "office": ("company", ["Technology Co.", "Trading Co.", "Consulting", "Investment Group", "Holdings"],
               ["科技有限公司", "贸易有限公司", "咨询公司", "投资集团", "控股"]),
    "coworking": ("brand", ["Coworking", "Shared Office", "Innovation Hub"], ["联合办公", "共享办公", "创客空间"]),
    "school": ("official", ["Primary School", "Middle School", "Experimental School"], ["小学", "中学", "实验学校"]),
    "kindergarten": ("official", ["Kindergarten", "Nursery"], ["幼儿园", "托儿所"]),
    "hospital": ("official", ["People's Hospital", "Hospital", "Maternity Hospital"], ["人民医院", "医院", "妇幼保健院"]),
    "clinic": ("shop", ["Clinic", "Dental Clinic", "Health Station"], ["诊所", "牙科诊所", "社区健康服务站"]),
    "government": ("official", ["Community Service Center", "Sub-district Office", "Residents' Committee"],
                   ["社区服务中心", "街道办事处", "居委会"]),
    "police_station": ("official", ["Police Station"], ["派出所"]),
    "post_office": ("official", ["Post Office"], ["邮政局"]),
    "library": ("official", ["Library", "Reading Room"], ["图书馆", "阅览室"]),
    "museum": ("official", ["Museum", "History Museum", "Folk Museum"], ["博物馆", "历史博物馆", "民俗博物馆"]),
    "temple": ("official", ["Temple", "Ancestral Hall", "Tianhou Temple"], ["寺", "祠堂", "天后宫"]),
    "heritage_site": ("official", ["Old Street", "Ancient Residence", "Memorial Hall", "Old Wall"],
                      ["老街", "古民居", "纪念馆", "古城墙"]),
    "art_gallery": ("shop", ["Gallery", "Art Space", "Studio"], ["画廊", "艺术空间", "工作室"]),
    "gym": ("brand", ["Fitness", "Gym", "Yoga"], ["健身", "健身房", "瑜伽"]),
    "cinema": ("brand", ["Cinema", "Cineplex"], ["影城", "电影院"]),
    "park": ("official", ["Park", "Garden", "Square"], ["公园", "花园", "广场"]),
    "bus_stop": ("bus", ["Bus Stop", "Station"], ["公交站", "站"]),
    "parking": ("official", ["Parking", "Car Park"], ["停车场", "停车库"]),
    "gas_station": ("brand", ["Gas Station", "Petrol Station"], ["加油站", "加气站"]),
    "factory": ("industry", ["Factory", "Manufacturing Co.", "Works"], ["厂", "制造有限公司", "工厂"]),
    "warehouse": ("industry", ["Warehouse", "Storage", "Depot"], ["仓库", "仓储", "货仓"]),
    "logistics_center": ("company", ["Logistics Center", "Logistics Park", "Distribution Center"],
                         ["物流中心", "物流园", "配送中心"]),
}

N_DRAWS = 6  # integer draws per POI consumed by make_names


def place_names(rng: np.random.Generator, n: int) -> list:
    """``n`` district place names as (english, chinese) pairs; distinct while the table lasts."""
    m = len(SYLLABLES)
    pairs = [(a, b) for a in range(m) for b in range(m) if a != b]
    order = rng.permutation(len(pairs))
    out = []
    for i in range(n):
        a, b = pairs[int(order[i % len(pairs)])]
        out.append((SYLLABLES[a][0] + SYLLABLES[b][0].lower(), SYLLABLES[a][1] + SYLLABLES[b][1]))
    return out


def make_names(categories, places, draws: np.ndarray, language: str) -> list:
    """One name per POI.

    Args:
        categories: category names, one per POI.
        places: (english, chinese) place name of each POI's district.
        draws: ``int64 [N, N_DRAWS]`` non-negative integers from the generator.
        language: "en" or "zh".
    """
    zh = language == "zh"
    li = 1 if zh else 0
    out = []
    for cat, place, r in zip(categories, places, draws.tolist()):
        style, en_nouns, zh_nouns = NOUNS[cat]
        nouns = zh_nouns if zh else en_nouns
        noun = nouns[r[0] % len(nouns)]
        pl = place[li]
        if style == "shop":
            mode = r[1] % 3
            if mode == 0:
                s = SURNAMES[r[2] % len(SURNAMES)][li]
                owner = s + "记" if zh else s + "'s"
            elif mode == 1:
                owner = ADJECTIVES[r[2] % len(ADJECTIVES)][li]
            else:
                owner = pl
            out.append(owner + noun if zh else f"{owner} {noun}")
        elif style == "brand":
            b = BRANDS[r[2] % len(BRANDS)][li]
            branch = r[1] % 2 == 0
            if zh:
                out.append(b + noun + (f"({pl}店)" if branch else ""))
            else:
                out.append(f"{b} {noun}" + (f" ({pl})" if branch else ""))
        elif style == "official":
            out.append(pl + noun if zh else f"{pl} {noun}")
        elif style == "estate":
            a = ESTATE_ADJ[r[2] % len(ESTATE_ADJ)][li]
            out.append(pl + a + noun if zh else f"{pl} {a} {noun}")
        elif style == "rental":
            if r[1] % 2 == 0:
                s = SURNAMES[r[2] % len(SURNAMES)][li]
                out.append(f"{s}家{noun}" if zh else f"{s} Family {noun}")
            else:
                k = 1 + r[3] % 99
                out.append(f"{pl}{k}号{noun}" if zh else f"{pl} No.{k} {noun}")
        elif style == "company":
            c = COMPANY[r[2] % len(COMPANY)][li]
            out.append(c + noun if zh else f"{c} {noun}")
        elif style == "industry":
            c = COMPANY[r[2] % len(COMPANY)][li]
            ind = INDUSTRY[r[3] % len(INDUSTRY)][li]
            out.append(c + ind + noun if zh else f"{c} {ind} {noun}")
        elif style == "bank":
            b = BANKS[r[2] % len(BANKS)][li]
            out.append(f"{b}{pl}{noun}" if zh else f"{b} {pl} {noun}")
        elif style == "bus":
            road = (pl + "路") if zh else f"{pl} Road"
            out.append(road + noun if zh else f"{road} {noun}")
        else:  # pragma: no cover - every category has a style above
            raise ValueError(f"unknown name style {style!r}")
    return out
